"""Shared fixtures: tiny random GPTBigCode checkpoints written by HF transformers (the reference)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GLOG_v", "3")
if "ZOO_COMPILE_CACHE" not in os.environ:  # one session's graphs, not the user's cache
    import tempfile

    os.environ["ZOO_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="zoo-test-compile-")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STARCODER2 = SHARED / "tokenizers" / "starcoder2"
BUNDLED_TOKENIZER = REPO / "src" / "wizardcoder_plugin" / "data" / "tokenizer"
PKG_DATA = REPO / "src" / "wizardcoder_plugin" / "data"
CODE_ALPACA_SAMPLE = PKG_DATA / "samples" / "code_alpaca_400.json"  # CI has no ../shared: in-tree copies only


def make_hf_checkpoint(path: Path, *, seed: int = 0, vocab: int = 49153, n_embd: int = 64, n_layer: int = 2,
                       n_head: int = 4, multi_query: bool = True, n_positions: int = 256,
                       activation: str = "gelu_pytorch_tanh", safe: bool = True, shard: str | None = None) -> Path:
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(seed)
    cfg = GPTBigCodeConfig(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                           n_head=n_head, multi_query=multi_query, activation_function=activation,
                           bos_token_id=0, eos_token_id=0, pad_token_id=vocab - 1, initializer_range=0.2)
    model = GPTBigCodeForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values so every tensor is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=safe, max_shard_size=shard or "10GB")
    return path


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory) -> Path:
    """MQA, 4 heads, the real 49153 vocabulary size, safetensors."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-mqa")


@pytest.fixture(scope="session")
def hf_mha(tmp_path_factory) -> Path:
    """Multi-head (not MQA), exact-erf GELU, small vocabulary, pytorch_model.bin."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-mha", seed=1, vocab=1000, n_embd=96, n_layer=3,
                              n_head=6, multi_query=False, activation="gelu", safe=False)


@pytest.fixture(scope="session")
def hf_model(hf_tiny):
    from transformers import GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM.from_pretrained(hf_tiny).eval()


def zoo(*args: str, env: dict | None = None, cwd: Path | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed CLI in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "registry_spec.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)

