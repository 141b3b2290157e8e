"""Weights: checkpoints read lazily from their headers (HF safetensors / sharded / pytorch_model.bin, MindSpore
.ckpt and .safetensors, in HF or the reference's naming), checked against the architecture, loaded into MindSpore
parameters without extra copies, saved and converted streaming."""

from .convert import convert, parse_size
from .loading import check_against, collect, load_into, load_params, save_params
from .sources import open_source
from .tensors import LazyTensor

__all__ = ["LazyTensor", "check_against", "collect", "convert", "load_into", "load_params", "open_source",
           "parse_size", "save_params"]
