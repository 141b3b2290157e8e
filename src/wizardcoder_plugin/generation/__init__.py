"""Inference: the online engine on the MindSpore network, and the throughput benchmark."""
