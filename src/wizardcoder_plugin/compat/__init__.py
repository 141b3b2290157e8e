"""Compatibility with mindformers (its registry), loaded only when mindformers is in use."""
