"""`zoo export` + `zoo predict --backend`: every backend's greedy tokens equal the online model's (which equal
HF's, see test_generate) for batch 1 and a padded batch, both modes; manifest checks; tampering refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED_TOKENIZER, zoo

from registry_spec.errors import BackendUnavailableError, InputError
from registry_spec.generation import Batch, GenerationConfig, Row, generate
from registry_spec.specs import ExportSpec
from wizardcoder_plugin.export.runner import ExportedEngine
from wizardcoder_plugin.export.writer import run_export, sha256
from wizardcoder_plugin.generation.online import Generator
from wizardcoder_plugin.model.config import load_config
from wizardcoder_plugin.model.runtime import build_model
from wizardcoder_plugin.text.tokenizer import WizardCoderTokenizer

pytestmark = pytest.mark.slow
PAD = 49152
PROMPTS = [[31, 7, 1200, 88, 5, 9000, 17], [404, 3, 77]]


def lite_available() -> bool:
    py = os.environ.get("ZOO_LITE_PYTHON")
    return bool(py) and Path(py).is_file()


def backends() -> list:
    out = ["mindir", "onnx"]
    # CI sets up the Lite runtime (scripts/setup.sh): there it must run, never skip
    if lite_available() or os.environ.get("CI"):
        out.append("lite")
    else:
        out.append(pytest.param("lite", marks=pytest.mark.skip(reason="no ZOO_LITE_PYTHON (scripts/setup.sh)")))
    return out


@pytest.fixture(scope="module")
def tiny(hf_tiny):
    config = load_config(hf_tiny / "config.json").model_copy(update={"seq_length": 64})
    net = build_model("custom", config, hf_tiny)
    online = Generator(net, eos_token_id=10**6, pad_token_id=PAD, max_batch=2)
    return config, net, online


def export(tmp_path, tiny, hf_tiny, backend, batch, mode="incremental") -> Path:
    config, net, _ = tiny
    out = tmp_path / f"{backend}-{batch}-{mode}"
    tok = WizardCoderTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    spec = ExportSpec(model="wizardcoder-tiny", backend=backend, output_dir=out, batch_size=batch, seq_length=64,
                      mode=mode)
    res = run_export(spec, net, config, tok, hf_tiny)
    assert res.manifest.is_file()
    return out


def greedy(engine, prompts, n=12):
    """The host's one loop over any engine, online or exported."""
    return [o.token_ids for o in generate(engine, prompts, GenerationConfig(max_new_tokens=n), 10**6, PAD)]


@pytest.mark.parametrize("backend", backends())
def test_backend_tokens_equal_online(tmp_path, tiny, hf_tiny, backend):
    _, _, online = tiny
    want = greedy(online, PROMPTS)
    padded = export(tmp_path, tiny, hf_tiny, backend, batch=2)
    gen = ExportedEngine(padded, backend)
    assert greedy(gen, PROMPTS) == want  # a right-padded batch of 2
    rows = [Row(p, GenerationConfig(max_new_tokens=12), np.random.default_rng(0)) for p in PROMPTS[:2]]
    batch = Batch(gen, 10**6, PAD, 2, 64)
    batch.open()  # continuous batching (zoo serve): the second row joins the running batch after 3 steps
    batch.admit(rows[:1])
    for _ in range(3):
        batch.step()
    batch.admit(rows[1:])
    while batch.rows:
        batch.step()
    assert [r.generated for r in rows] == want[:2]
    # rows arriving together join in one call of the full-batch graph (each join runs all of it), same tokens
    prefills, prefill = [], gen.prefill
    gen.prefill = lambda *args: prefills.append(len(args[0])) or prefill(*args)
    together = [Row(p, GenerationConfig(max_new_tokens=12), np.random.default_rng(0)) for p in PROMPTS[:2]]
    batch = Batch(gen, 10**6, PAD, 2, 64)
    batch.open()
    prefills.clear()
    batch.admit(together)
    assert prefills == [2]
    while batch.rows:
        batch.step()
    assert [r.generated for r in together] == want[:2]
    single = export(tmp_path, tiny, hf_tiny, backend, batch=1)
    gen1 = ExportedEngine(single, backend)
    assert greedy(gen1, PROMPTS[:1]) == want[:1]
    manifest = json.loads((padded / "manifest.json").read_text())
    assert manifest["backend"] == backend and manifest["mode"] == "incremental"
    assert set(manifest["graphs"]) == {"prefill", "decode"}
    assert manifest["graphs"]["decode"]["inputs"][2] == {"name": "cache", "shape": [2, 2, 64, 32],
                                                         "dtype": "float32"}
    assert manifest["architecture"]["n_embd"] == 64 and manifest["source_weights"]["sha256"]
    for name, digest in manifest["files"].items():
        assert sha256(padded / name) == digest
    assert "tokenizer.json" in manifest["files"]
    if backend == "lite":
        assert "ge.exec.precision_mode=must_keep_origin_dtype" in (padded / "lite_ascend.ini").read_text()


@pytest.mark.parametrize("backend", ["mindir", "onnx"])
def test_autoregressive_mode(tmp_path, tiny, hf_tiny, backend):
    _, _, online = tiny
    out = export(tmp_path, tiny, hf_tiny, backend, batch=2, mode="autoregressive")
    assert set(json.loads((out / "manifest.json").read_text())["graphs"]) == {"full"}
    gen = ExportedEngine(out, backend)
    assert greedy(gen, PROMPTS, 8) == greedy(online, PROMPTS, 8)


def test_tampered_or_mismatched_artifacts_are_refused(tmp_path, tiny, hf_tiny):
    out = export(tmp_path, tiny, hf_tiny, "onnx", batch=1)
    with pytest.raises(InputError, match="holds a 'onnx' export, not 'mindir'"):
        ExportedEngine(out, "mindir")
    with (out / "decode.onnx").open("r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(InputError, match="decode.onnx does not match its sha256"):
        ExportedEngine(out, "onnx")
    (out / "decode.onnx").unlink()
    with pytest.raises(InputError, match="missing"):
        ExportedEngine(out, "onnx")


def test_missing_lite_runtime_names_the_install_step(tmp_path, tiny, hf_tiny, monkeypatch):
    monkeypatch.setenv("ZOO_LITE_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(BackendUnavailableError, match="lite_runtime setup"):
        export(tmp_path, tiny, hf_tiny, "lite", batch=1)
    assert not (tmp_path / "lite-1-incremental").exists()


def test_cli_export_and_predict(tmp_path):
    out = tmp_path / "exp"
    r = zoo("export", "wizardcoder-tiny", "--backend", "onnx", "--output-dir", str(out), "--seq-length", "96",
            "--json")
    assert r.returncode == 0, r.stderr
    assert "manifest.json" in json.loads(r.stdout)["files"]
    args = ["--prompt", "def add(a, b):", "--template", "none", "--max-new-tokens", "6", "--json"]
    online = zoo("predict", "wizardcoder-tiny", *args)
    exported = zoo("predict", "wizardcoder-tiny", "--backend", "onnx", "--artifacts", str(out), *args)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["token_ids"] == json.loads(online.stdout)["token_ids"]
    bad = zoo("predict", "wizardcoder-tiny", "--backend", "onnx", *args)
    assert bad.returncode != 0 and "--artifacts" in bad.stderr
    assert "export" in json.loads(zoo("show", "wizardcoder-tiny", "--json").stdout)["capabilities"]
    # a later export may replace this folder; a folder with anything else in it, or a file, it refuses (exit 2)
    from wizardcoder_plugin.export.writer import earlier_export

    assert earlier_export(out)
    (out / "notes.txt").write_text("mine")
    assert not earlier_export(out)
    for target, says in ((out, "not an earlier output"), (out / "notes.txt", "is a file")):
        r = zoo("export", "wizardcoder-tiny", "--backend", "onnx", "--output-dir", str(target))
        assert r.returncode == 2 and str(target) in r.stderr and says in r.stderr, r.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()
    r = zoo("export", "wizardcoder-tiny", "--backend", "onnx", "--output-dir", str(tmp_path / "long"),
            "--weights", str(tmp_path / "none"), "--seq-length", "100000")
    assert r.returncode == 2 and "exceeds the model's 512 positions" in r.stderr, r.stderr  # before the weights
    shutil.rmtree(out)



def test_fp16_export_matches_fp16_online(tmp_path, hf_tiny):
    """fp16 graphs: logits within fp16 rounding of the online fp16 model (greedy can flip on near-ties, e.g. a
    top-2 gap of 0.008 against a 0.005 rounding difference, so tokens are not compared)."""
    import mindspore as ms

    from wizardcoder_plugin.model.inference import KVCache, PrefillCell

    config = load_config(hf_tiny / "config.json").model_copy(update={"seq_length": 64})
    net = build_model("custom", config, hf_tiny, precision="fp16")
    tok = WizardCoderTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    out = tmp_path / "fp16"
    run_export(ExportSpec(model="wizardcoder-tiny", backend="onnx", output_dir=out, batch_size=2, seq_length=64,
                          precision="fp16"), net, config, tok, hf_tiny)
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp16"
    ids = np.full((2, 64), PAD, np.int32)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = p
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    exported, _ = ExportedEngine(out, "onnx").runtime.graphs["prefill"](ids, lengths)
    online = PrefillCell(net, KVCache(config, 2, 64, ms.float16, "fp16test"))(ms.Tensor(ids[:, :16]),
                                                                              ms.Tensor(lengths)).asnumpy()
    assert np.abs(exported - online).max() < 2e-2


def test_multi_head_export_graphs_equal_the_online_model():
    """The exported graphs on a multi-head model (their fused per-head key|value cache), run in MindSpore before
    any export: full, and prefill + one decode step, against the online model's last-token logits."""
    import mindspore as ms

    from wizardcoder_plugin.export.graphs import DecodeGraph, FullGraph, PrefillGraph
    from wizardcoder_plugin.model.config import GPTBigCodeConfig
    from wizardcoder_plugin.model.inference import LastTokenCell
    from wizardcoder_plugin.model.modeling import GPTBigCodeForCausalLM
    from wizardcoder_plugin.model.runtime import init_mindspore

    init_mindspore()
    cfg = GPTBigCodeConfig(n_embd=96, n_layer=2, n_head=6, multi_query=False, vocab_size=1000, n_positions=64,
                           seq_length=64)
    net = GPTBigCodeForCausalLM(cfg)
    net.set_train(False)
    ids = np.random.default_rng(0).integers(0, 999, (2, 16)).astype(np.int32)
    lengths = np.array([10, 7], np.int32)
    ref = LastTokenCell(net)(ms.Tensor(ids), ms.Tensor(lengths)).asnumpy()
    assert np.abs(FullGraph(net)(ms.Tensor(ids), ms.Tensor(lengths)).asnumpy() - ref).max() < 1e-5
    _, cache = PrefillGraph(net)(ms.Tensor(ids), ms.Tensor(lengths - 1))
    last = ids[np.arange(2), lengths - 1].reshape(2, 1)
    logits, _ = DecodeGraph(net)(ms.Tensor(last), ms.Tensor(lengths - 1), cache)
    assert np.abs(logits.asnumpy() - ref).max() < 1e-5
