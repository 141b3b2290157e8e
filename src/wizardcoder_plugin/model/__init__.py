"""The network, its architecture, building it in MindSpore, and the memory plan."""
