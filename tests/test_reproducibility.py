"""Reproducible training with the native kernels on: the same seed gives bit-identical weights, optimizer state
and losses; a run killed with SIGKILL and resumed on an empty kernel cache (as on another machine) ends bit for bit
where the uninterrupted run does; a recorded choice that cannot be honoured is reported. (Data parallel repeats:
test_train.py's msrun test.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CODE_ALPACA_SAMPLE, zoo

from wizardcoder_plugin.kernels import availability
from wizardcoder_plugin.training.trainer import checkpoints

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not availability()[0], reason="the native kernels cannot be built here")]
TIMING = ("tokens_per_s", "step_s")


SMALL = {"model_type": "gpt_bigcode", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
         "vocab_size": 49153, "multi_query": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """CodeAlpaca rows, and beside them a small architecture (every kind of layer, quick to compile)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "config.json").write_text(json.dumps(SMALL))
    out = folder / "ca.mindrecord"
    r = zoo("preprocess", "wizardcoder-tiny", "--input", str(CODE_ALPACA_SAMPLE), "--output", str(out),
            "--seq-length", "64", "--limit", "48")
    assert r.returncode == 0, r.stderr
    return out


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "wizardcoder-tiny", "--config", str(data.with_name("config.json")), "--data", str(data),
            "--mode", "pretrain", "--seed", "7",
            "--output-dir", str(out), "--max-steps", "8", "--batch-size", "4", "--learning-rate", "1e-3",
            "--warmup-steps", "2", "--save-steps", "1", "--keep-checkpoints", "8", *extra]


def run(data: Path, out: Path, cache: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = zoo(*train_args(data, out, *extra), env={"ZOO_KERNEL_CACHE": str(cache), **(env or {})})
    assert r.returncode == 0, r.stderr
    return r


def tensors(ckpt: Path) -> dict[str, np.ndarray]:
    from wizardcoder_plugin.weights.sources import raw_tensors

    return {k: t.read() for k, t in raw_tensors(ckpt)}


def assert_bit_identical(a: Path, b: Path) -> None:
    """Two runs' final checkpoints (weights and optimizer state) and metrics, to the bit."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        x, y = tensors(a / "checkpoint-8" / name), tensors(b / "checkpoint-8" / name)
        assert x.keys() == y.keys()
        differ = [k for k in x if x[k].tobytes() != y[k].tobytes()]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIMING}
             for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert rows[0] == rows[1]


def numerics(out: Path) -> dict:
    return json.loads((checkpoints(out)[-1] / "state.json").read_text())["numerics"]


def test_same_seed_twice_is_bit_identical_in_fp16(data, tmp_path):
    cache = tmp_path / "cache"  # empty: the first run times its backward choices, the second takes them
    run(data, tmp_path / "a", cache, "--precision", "fp16")
    run(data, tmp_path / "b", cache, "--precision", "fp16")
    assert_bit_identical(tmp_path / "a", tmp_path / "b")
    assert numerics(tmp_path / "a") == numerics(tmp_path / "b")


def _flip(cache: Path, into: Path) -> None:
    """Another machine's timing: every cached backward choice the other way round (native <-> MindSpore's; the
    K-chunked backward sums as MindSpore's does, so it counts as MindSpore's here)."""
    flipped = {k: "mindspore" if v == "native" else "native"
               for k, v in json.loads((cache / "choices.json").read_text()).items()}
    into.mkdir()
    (into / "choices.json").write_text(json.dumps(flipped))


def test_same_seed_twice_and_a_resume_after_sigkill_on_an_empty_cache_are_bit_identical(data, tmp_path):
    full, cache = tmp_path / "full", tmp_path / "cache"
    run(data, full, cache)  # an empty cache: this run times its backward choices, the next takes them
    run(data, tmp_path / "again", cache)
    assert_bit_identical(full, tmp_path / "again")
    rec = numerics(full)
    assert rec == numerics(tmp_path / "again") and rec["native_kernels"] and rec["kernel_threads"] >= 1
    cached = json.loads((cache / "choices.json").read_text())  # every linear shape had a choice: the cache's
    assert sorted(rec["linear_backward"].values()) == sorted(cached.values()) and len(cached) == 4
    # a fresh run takes a flipped cache's choices (whether they change the bits depends on the machine: on a
    # 2-vCPU EPYC the native and MindSpore backward agreed bitwise at these shapes) ...
    _flip(cache, tmp_path / "flipped")
    run(data, tmp_path / "other", tmp_path / "flipped")
    flipped = {k: "mindspore" if v == "native" else "native" for k, v in rec["linear_backward"].items()}
    assert numerics(tmp_path / "other")["linear_backward"] == flipped
    # ... and the same run killed, then resumed on a fresh cache that holds them (as on another machine), still
    # follows its own record
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "-m", "registry_spec.cli", *train_args(data, part)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ | {"ZOO_KERNEL_CACHE": str(cache)})
    deadline = time.time() + 300
    while len(checkpoints(part)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(checkpoints(part)[-1].name.split("-")[1])
    assert 3 <= killed_at < 8, "the run finished before it could be killed"
    _flip(cache, tmp_path / "flipped-2")
    shutil.copytree(part, tmp_path / "part-without-kernels")
    r = run(data, part, tmp_path / "flipped-2", "--resume")
    assert "no longer bit-exact" not in r.stderr
    assert numerics(part)["linear_backward"] == rec["linear_backward"]  # its record, not the flipped cache
    assert_bit_identical(full, part)
    # a recorded choice that cannot be honoured: said, and the run goes on
    r = run(data, tmp_path / "part-without-kernels", tmp_path / "cache-c", "--resume",
            env={"ZOO_NATIVE_KERNELS": "0"})
    assert "the native CPU kernels the run used are unavailable now" in r.stderr
    assert "no longer bit-exact" in r.stderr
    assert json.loads((tmp_path / "part-without-kernels" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8
