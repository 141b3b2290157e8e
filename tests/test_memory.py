"""The memory plan: its figures against what MindSpore actually allocates and against a measured run's peak, and
the refusal (exit 2, figures, options) of a run that cannot fit, under $ZOO_MEMORY_LIMIT and a real cgroup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_hf_checkpoint, zoo

from wizardcoder_plugin.model.config import PRESETS, load_config
from wizardcoder_plugin.model.memory import (
    MemoryPlan,
    inference_plan,
    kv_bytes_per_token,
    training_plan,
    training_state_bytes,
    weight_bytes,
)

GIB = 2**30
TOKENIZER = str(REPO / "src/wizardcoder_plugin/data/tokenizer")


def _nbytes(params) -> int:
    return sum(int(np.prod(p.shape)) * p.itemsize for p in params)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plan_figures_equal_what_mindspore_allocates(precision):
    from wizardcoder_plugin.model.inference import KVCache
    from wizardcoder_plugin.model.modeling import GPTBigCodeForCausalLM
    from wizardcoder_plugin.model.runtime import init_mindspore
    from wizardcoder_plugin.training.optim import AdamW, fp32_zeros

    ms = init_mindspore()
    config = PRESETS["wizardcoder-tiny"]
    net = GPTBigCodeForCausalLM(config, precision)
    params = list(net.trainable_params())
    assert _nbytes(params) == weight_bytes(config, precision)
    cache = KVCache(config, 3, 64, {"fp32": ms.float32, "fp16": ms.float16}[precision], tag="t")
    assert _nbytes(cache.get_parameters()) == 3 * 64 * kv_bytes_per_token(config, precision)
    accum = fp32_zeros(params, "accum")
    adamw = AdamW(params, accum, 0.9, 0.95, 1e-8, 0.0)
    state = list(accum) + list(adamw.m) + list(adamw.v) + list(adamw.master)
    assert _nbytes(state) == training_state_bytes(config, precision)


MEASURE = """
import os, sys, subprocess
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""


def peak_of(*args: str, env: dict | None = None) -> int:
    r = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "registry_spec.cli", *args],
                       capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)
    code, peak = r.stdout.split()
    assert code == "0", r.stderr
    return int(peak)


def test_plan_matches_a_measured_predict(tmp_path_factory):
    """A 500 MB model's predict: the plan's total is within 25% of the measured peak resident set."""
    src = tmp_path_factory.getbasetemp() / "hf-500mb"
    if not src.exists():
        make_hf_checkpoint(src, n_embd=768, n_layer=12, n_head=12, n_positions=512)
    config = load_config(src / "config.json")
    peak = peak_of("predict", "wizardcoder-1b", "--config", str(src / "config.json"), "--weights", str(src),
                   "--tokenizer", TOKENIZER, "--prompt", "def f(x):",
                   "--max-new-tokens", "8", "--batch-size", "1")
    plan = inference_plan(config, "fp32", 1, 64, 16)
    print(plan.describe(), peak / GIB)
    assert 0.75 * peak < plan.total < 1.25 * peak, (plan.describe(), peak / GIB)


def test_training_plan_covers_a_measured_train(tmp_path_factory):
    """A 44M-parameter model's `zoo train` step (batch 4 x 128): the plan's total is at least the measured peak
    resident set and within 25% above it (a plan below the peak would let a run in that cannot fit)."""
    tmp = tmp_path_factory.mktemp("train-plan")
    src = make_hf_checkpoint(tmp / "hf", n_embd=512, n_layer=6, n_head=8, n_positions=512)
    data = tmp / "d.mindrecord"
    r = zoo("preprocess", "wizardcoder-tiny", "--input", str(REPO / "src/wizardcoder_plugin/data/samples/"
            "code_alpaca_400.json"), "--output", str(data), "--seq-length", "128", "--limit", "40")
    assert r.returncode == 0, r.stderr
    peak = peak_of("train", "wizardcoder-tiny", "--config", str(src / "config.json"), "--data", str(data),
                   "--mode", "pretrain", "--output-dir", str(tmp / "run"), "--max-steps", "1", "--batch-size", "4",
                   "--seq-length", "128")
    plan = training_plan(load_config(src / "config.json"), "fp32", 4, 128)
    print(plan.describe(), peak / GIB)
    assert peak < plan.total < 1.25 * peak, (plan.describe(), peak / GIB)


def test_refused_under_zoo_memory_limit_before_reading_weights(hf_tiny, tmp_path):
    """The 1B network's plan (5.6 GiB at batch 8) does not fit 2 GB: refused before the checkpoint (of another shape) is
    even opened, with the figures and the options. (The file, not its folder: the folder's config.json would be
    the architecture.)"""
    weights = str(hf_tiny / "model.safetensors")
    r = zoo("predict", "wizardcoder-1b", "--weights", weights, "--tokenizer", TOKENIZER, "--prompt", "x",
            env={"ZOO_MEMORY_LIMIT": "2GB"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "needs about 5.6" in r.stderr and "weights 4.24" in r.stderr and "$ZOO_MEMORY_LIMIT" in r.stderr
    assert "--precision fp16" in r.stderr and "--batch-size" in r.stderr
    r = zoo("predict", "wizardcoder-15b", "--weights", weights, "--tokenizer", TOKENIZER, "--prompt", "x",
            "--precision", "fp16",
            env={"ZOO_MEMORY_LIMIT": "24GB"})
    assert r.returncode == 2 and "needs about 30" in r.stderr and "--precision fp16" not in r.stderr, r.stderr


def test_train_refused_with_its_own_options(tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}] * 8))
    r = zoo("preprocess", "wizardcoder-tiny", "--input", str(data), "--output", str(tmp_path / "d.mindrecord"),
            "--seq-length", "64")
    assert r.returncode == 0, r.stderr
    r = zoo("train", "wizardcoder-tiny", "--data", str(tmp_path / "d.mindrecord"), "--output-dir",
            str(tmp_path / "run"), "--max-steps", "1", env={"ZOO_MEMORY_LIMIT": "500MB"})
    assert r.returncode == 2 and "zoo train needs about" in r.stderr and "--grad-accum" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("checkpoint-*"))


def _memory_cgroup() -> Path | None:
    """A fresh memory cgroup this process may write (root, v1 or v2), else None."""
    for base, limit in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"), (Path("/sys/fs/cgroup"),
                                                                                  "memory.max")):
        if (base / limit).exists() or (base / "cgroup.procs").exists() and base.name != "memory":
            try:
                group = Path(tempfile.mkdtemp(prefix="zoo-test-", dir=base))
            except OSError:
                continue
            if (group / limit).exists():
                return group
            group.rmdir()
    return None


def test_refused_inside_a_real_cgroup_limit(hf_tiny):
    group = _memory_cgroup()
    if group is None:
        pytest.skip("no writable memory cgroup here (needs root and a memory controller)")
    limit = group / ("memory.limit_in_bytes" if (group / "memory.limit_in_bytes").exists() else "memory.max")
    try:
        limit.write_text(str(3 * GIB))
        cmd = (f"echo $$ > {group}/cgroup.procs && exec {sys.executable} -m registry_spec.cli predict "
               f"wizardcoder-1b --weights {hf_tiny / 'model.safetensors'} --tokenizer {TOKENIZER} --prompt x")
        env = {k: v for k, v in os.environ.items() if k != "ZOO_MEMORY_LIMIT"}
        r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, cwd=REPO, env=env)
        assert r.returncode == 2 and "the cgroup limit of 3.00 GiB" in r.stderr, r.stderr
    finally:
        group.rmdir()


def test_show_json_carries_the_figures():
    r = zoo("show", "wizardcoder-15b", "--json")
    memory = json.loads(r.stdout)["memory"]
    assert memory["parameters"] == PRESETS["wizardcoder-15b"].num_parameters()
    assert memory["weights_bytes"]["fp16"] == weight_bytes(PRESETS["wizardcoder-15b"], "fp16")
    assert 30e9 < memory["weights_bytes"]["fp16"] < 32e9
    assert memory["kv_cache_bytes_per_token"]["fp16"] == 2 * 40 * 128 * 2  # multi-query: one key/value head
    assert MemoryPlan("x", {"a": 1, "b": 2}).total == 3
