"""`zoo bench`: rows for every engine and grid point, HF measured in the same run on the same weights (and
producing the same tokens), markdown table and PNG plot written."""

from __future__ import annotations

import json
import os

import pytest
from conftest import zoo

pytestmark = pytest.mark.slow


def test_bench_against_hf(tmp_path, hf_tiny):
    out = tmp_path / "bench"
    r = zoo("bench", "wizardcoder-tiny", "--config", str(hf_tiny / "config.json"), "--weights", str(hf_tiny),
            "--backends", "online,onnx", "--batch-sizes", "1,2", "--lengths", "24", "--prompt-length", "8",
            "--repeats", "1", "--compare", "hf", "--output-dir", str(out), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [(x["backend"], x["batch_size"]) for x in rows] == [
        ("online", 1), ("onnx", 1), ("hf-transformers", 1), ("online", 2), ("onnx", 2), ("hf-transformers", 2)]
    for x in rows:
        assert x["total_length"] == 24 and x["decode_tokens_per_s"] > 0 and x["prefill_ms"] > 0
        assert x["extra"]["generated_tokens"] == x["batch_size"] * 16
        if x["backend"] != "hf-transformers":
            assert x["extra"]["tokens_equal_hf"] is True  # same weights, greedy: the same tokens as HF
            assert x["extra"]["decode_speedup_vs_hf"] > 0
            if x["backend"] == "online":  # what the online graphs picked is reported
                kernels, layout = x["extra"]["kernels"], x["extra"].get("head_layout")
                assert kernels in ("native", "mindspore")
                assert (layout in ("tied", "transposed")) == (kernels == "mindspore")
                assert (x["extra"].get("kernel_threads", 0) >= 1) == (kernels == "native")
        elif not os.environ.get("OMP_NUM_THREADS"):
            # the reference's own process uses every CPU, not MindSpore's C-level OMP_NUM_THREADS=1
            assert x["extra"]["threads"] == len(os.sched_getaffinity(0))
    assert json.loads((out / "bench.json").read_text())["rows"] == rows
    assert "| hf-transformers | 2 | 24 |" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    bad = zoo("bench", "wizardcoder-tiny", "--lengths", "8", "--prompt-length", "8")
    assert bad.returncode != 0 and "must exceed --prompt-length" in bad.stderr
    bad = zoo("bench", "wizardcoder-tiny", "--weights", str(tmp_path / "none"), "--backends", "online,nosuch")
    assert bad.returncode == 2 and "no exporter 'nosuch'" in bad.stderr, bad.stderr  # before the weights load


def test_compare_hf_without_the_reference_installed_is_refused_before_the_weights(monkeypatch):
    import importlib.util

    from registry_spec.errors import BackendUnavailableError
    from registry_spec.specs import BenchSpec
    from wizardcoder_plugin.generation import bench
    from wizardcoder_plugin.model.config import PRESETS

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(BackendUnavailableError, match="torch / transformers are not installed"):
        bench.check_spec(BenchSpec(model="wizardcoder-tiny", compare=["hf"]), None, PRESETS["wizardcoder-tiny"])
