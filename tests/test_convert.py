"""Weight conversion: HF <-> MindSpore bit-exact, every HF layout, the reference's naming, clear shape errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_hf_checkpoint, zoo

from registry_spec.errors import InputError, WeightsUnavailableError
from wizardcoder_plugin.model.config import load_config
from wizardcoder_plugin.weights import collect, convert
from wizardcoder_plugin.weights.safetensors_files import lazy_tensors


def tensors_of(path):
    return {n: t.read() for f in sorted(path.glob("*.safetensors")) for n, t in lazy_tensors(f)}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_hf_ms_hf_round_trip_is_bit_exact(hf_tiny, tmp_path, suffix):
    import mindspore as ms

    cfg = load_config(hf_tiny / "config.json")
    r1 = convert(hf_tiny, tmp_path / f"m{suffix}", cfg, to="ms", progress=False)
    r2 = convert(tmp_path / f"m{suffix}", tmp_path / "back", cfg, to="hf", progress=False)
    src, back = tensors_of(hf_tiny), tensors_of(tmp_path / "back")
    src.pop("lm_head.weight", None)
    assert set(src) == set(back)
    for name in src:
        assert src[name].dtype == back[name].dtype and np.array_equal(src[name], back[name]), name
    assert r1.parameters == r2.parameters == cfg.num_parameters()
    # MindSpore's own loader reads what the converter wrote
    loaded = ms.load_checkpoint(str(tmp_path / f"m{suffix}"), format=suffix[1:])
    assert set(loaded) == set(src) and all(np.array_equal(loaded[n].asnumpy(), src[n]) for n in src)
    from transformers import GPTBigCodeForCausalLM

    GPTBigCodeForCausalLM.from_pretrained(tmp_path / "back")  # loadable by the reference


def test_dtype_conversion_and_bf16(hf_tiny, tmp_path):
    cfg = load_config(hf_tiny / "config.json")
    convert(hf_tiny, tmp_path / "bf16", cfg, to="hf", dtype="bf16", progress=False)
    import torch
    from safetensors.torch import load_file

    got = load_file(tmp_path / "bf16" / "model.safetensors")
    ref = load_file(hf_tiny / "model.safetensors")
    for name, t in got.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[name].to(torch.bfloat16)), name


def test_sharded_safetensors_and_pytorch_bin(tmp_path, hf_tiny):
    sharded = make_hf_checkpoint(tmp_path / "sharded", shard="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = make_hf_checkpoint(tmp_path / "bin", safe=False)
    assert (binary / "pytorch_model.bin").is_file()
    ref = tensors_of(hf_tiny)
    cfg = load_config(hf_tiny / "config.json")
    for src in (sharded, binary):
        loaded = {n: t.read() for n, t in collect(src, cfg).items()}
        assert set(loaded) == set(ref) - {"lm_head.weight"}
        for n, a in loaded.items():
            assert np.array_equal(a, ref[n]), (src, n)


def test_reference_mindformers_naming(hf_tiny, tmp_path):
    """A ckpt written with the reference's names and layout (q/k/v split, dense weights transposed) loads."""
    import mindspore as ms

    cfg = load_config(hf_tiny / "config.json")
    src = tensors_of(hf_tiny)
    h, kv = cfg.n_embd, cfg.head_dim
    entries = []

    def add(name, arr):
        entries.append({"name": name, "data": ms.Tensor(np.ascontiguousarray(arr))})

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        b = f"backbone.blocks.{i}."
        add(b + "layernorm1.gamma", src[p + "ln_1.weight"])
        add(b + "layernorm1.beta", src[p + "ln_1.bias"])
        add(b + "layernorm2.gamma", src[p + "ln_2.weight"])
        add(b + "layernorm2.beta", src[p + "ln_2.bias"])
        for kind in ("weight", "bias"):
            q, k, v = np.split(src[p + f"attn.c_attn.{kind}"], [h, h + kv], 0)
            for j, part in zip("123", (q, k, v), strict=True):
                add(b + f"attention.dense{j}.{kind}", part)
        add(b + "attention.projection.weight", src[p + "attn.c_proj.weight"].T)
        add(b + "attention.projection.bias", src[p + "attn.c_proj.bias"])
        add(b + "output.mapping.weight", src[p + "mlp.c_fc.weight"].T)
        add(b + "output.mapping.bias", src[p + "mlp.c_fc.bias"])
        add(b + "output.projection.weight", src[p + "mlp.c_proj.weight"].T)
        add(b + "output.projection.bias", src[p + "mlp.c_proj.bias"])
    add("backbone.layernorm.gamma", src["transformer.ln_f.weight"])
    add("backbone.layernorm.beta", src["transformer.ln_f.bias"])
    add("backbone.embedding.word_embedding.embedding_table", src["transformer.wte.weight"])
    add("backbone.embedding.position_embedding.embedding_table", src["transformer.wpe.weight"])
    add("head.head_weight", src["transformer.wte.weight"])
    add("adam_m.backbone.layernorm.gamma", src["transformer.ln_f.weight"])  # optimizer state is skipped
    ms.save_checkpoint(entries, str(tmp_path / "ref.ckpt"))
    loaded = {n: t.read() for n, t in collect(tmp_path / "ref.ckpt", cfg).items()}
    for n, a in loaded.items():
        assert np.array_equal(a, src[n]), n


def test_shape_mismatch_names_tensors_and_shapes(hf_tiny, tmp_path):
    from wizardcoder_plugin.model.config import PRESETS

    with pytest.raises(InputError) as exc:
        convert(hf_tiny, tmp_path / "x.ckpt", PRESETS["wizardcoder-tiny"], progress=False)
    msg = str(exc.value)
    assert "transformer.h.0.attn.c_attn.weight: checkpoint (96, 64) vs model (384, 256)" in msg
    assert "n_layer=4, n_embd=256" in msg  # the architecture in use
    assert "missing 24" in msg and "transformer.h.2.ln_1.weight" in msg
    assert not (tmp_path / "x.ckpt").exists() and not list(tmp_path.iterdir())
    with pytest.raises(WeightsUnavailableError, match="model.safetensors"):
        collect(tmp_path, PRESETS["wizardcoder-tiny"])


def test_zoo_convert_cli_both_directions(hf_tiny, tmp_path):
    r = zoo("convert", "wizardcoder-tiny", "--input", str(hf_tiny), "--output", str(tmp_path / "w.safetensors"),
            "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tensors"] == 2 + 12 * 2 + 2
    r = zoo("convert", "wizardcoder-tiny", "--input", str(tmp_path / "w.safetensors"), "--output", str(tmp_path / "hf"),
            "--to", "hf", "--config", str(hf_tiny / "config.json"), "--json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    r = zoo("convert", "wizardcoder-tiny", "--input", str(hf_tiny), "--output", str(tmp_path / "bad.ckpt"),
            "--config", "/nonexistent/config.json")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = zoo("convert", "wizardcoder-tiny", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and f"input {tmp_path / 'none'} does not exist" in r.stderr, r.stderr
    r = zoo("show", "wizardcoder-tiny", "--json")
    assert "convert" in json.loads(r.stdout)["capabilities"]


def test_wrong_shapes_are_refused_before_the_network_is_built(hf_tiny, monkeypatch):
    """The checkpoint's names and shapes are checked from its headers first: at the real model's size a mismatch
    must not cost building (allocating) the whole network."""
    import wizardcoder_plugin.model.modeling as modeling
    from wizardcoder_plugin.model.config import load_config
    from wizardcoder_plugin.model.runtime import build_model

    def not_yet(*_args, **_kwargs):
        raise AssertionError("the network was built before the weights were checked")

    monkeypatch.setattr(modeling, "GPTBigCodeForCausalLM", not_yet)
    config = load_config(hf_tiny).model_copy(update={"n_embd": 128})
    with pytest.raises(InputError, match="do not match the model architecture"):
        build_model("custom", config, hf_tiny)


def test_an_output_the_disk_cannot_hold_is_exit_2_and_leaves_nothing(hf_tiny, tmp_path):
    """A write the machine refuses (here the file size limit, as a full disk or quota would): exit 2 with what to
    change, no traceback, nothing under the output's name or beside it."""
    import resource
    import signal
    import subprocess
    import sys

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "registry_spec.cli", "convert", "wizardcoder-tiny", "--input",
                        str(hf_tiny), "--output", str(out / "w.safetensors")], capture_output=True, text=True,
                       preexec_fn=limit, timeout=300)
    assert r.returncode == 2 and "error: File too large" in r.stderr and "ulimit -f" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and list(out.iterdir()) == []

