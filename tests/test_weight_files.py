"""Checkpoint files read from their headers and written streaming: MindSpore's .ckpt wire format both ways
(slices, crc trailer, bf16), HF shards with an index, damaged files refused clearly, and a conversion whose peak
memory does not grow with the model."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from conftest import make_hf_checkpoint, zoo

from registry_spec.errors import InputError
from wizardcoder_plugin.model.config import load_config
from wizardcoder_plugin.weights import ckpt_files, collect, convert
from wizardcoder_plugin.weights.tensors import LazyTensor


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((33, 17)).astype(np.float32),
            "b.bias": rng.standard_normal(5).astype(np.float16),
            "c.scalar": np.array(7, dtype=np.int64)}


def _lazy(arr: np.ndarray, dtype: str) -> LazyTensor:
    return LazyTensor(arr.shape, dtype, lambda: arr)


def test_ckpt_written_by_mindspore_with_slices_and_crc_is_read(tmp_path, monkeypatch):
    import mindspore as ms
    import mindspore.train.serialization as serialization

    arrays = _arrays()
    bf16 = ms.Tensor(arrays["a.weight"]).astype(ms.bfloat16)
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KB: every tensor over 1 KB is split into values
    for crc in (False, True):
        path = tmp_path / f"ms-{crc}.ckpt"
        ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in arrays.items()]
                           + [{"name": "d.bf16", "data": bf16}], str(path), crc_check=crc)
        got = {n: t for n, t in ckpt_files.lazy_tensors(path)}
        for name, arr in arrays.items():
            assert got[name].shape == arr.shape and np.array_equal(got[name].read(), arr), name
        assert got["d.bf16"].dtype == "BF16"
        assert np.array_equal(got["d.bf16"].read().view(np.uint16), bf16.asnumpy().view(np.uint16))


def test_ckpt_written_here_is_read_by_mindspore(tmp_path):
    import mindspore as ms

    arrays = _arrays(1)
    bits = arrays["a.weight"].astype(ml_dtypes.bfloat16)
    items = [("a.weight", _lazy(arrays["a.weight"], "F32")), ("b.bias", _lazy(arrays["b.bias"], "F16")),
             ("c.scalar", _lazy(arrays["c.scalar"], "I64")), ("d.bf16", _lazy(bits, "BF16"))]
    ckpt_files.write_file(tmp_path / "x.ckpt", items, slice_bytes=256)  # several values per tensor
    loaded = ms.load_checkpoint(str(tmp_path / "x.ckpt"))
    for name, arr in arrays.items():
        assert np.array_equal(loaded[name].asnumpy(), arr), name
    assert np.array_equal(loaded["d.bf16"].asnumpy().view(np.uint16), bits.view(np.uint16))
    assert {n: t.read().tobytes() for n, t in ckpt_files.lazy_tensors(tmp_path / "x.ckpt")} == \
        {n: t.read().tobytes() for n, t in items}


def test_sharded_hf_output_follows_hf_index_convention(hf_tiny, tmp_path):
    from transformers import GPTBigCodeForCausalLM

    cfg = load_config(hf_tiny / "config.json")
    out = tmp_path / "sharded"
    convert(hf_tiny, out, cfg, to="hf", max_shard_size="400KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in collect(hf_tiny, cfg).values())
    assert all(s.stat().st_size < 400_000 + 200_000 for s in shards[1:-1])  # one tensor may pass the size alone
    ref = GPTBigCodeForCausalLM.from_pretrained(hf_tiny).state_dict()
    got = GPTBigCodeForCausalLM.from_pretrained(out).state_dict()
    assert all(np.array_equal(ref[n].numpy(), got[n].numpy()) for n in ref)
    # converting again with one shard replaces the shards rather than leaving them beside model.safetensors
    convert(hf_tiny, out, cfg, to="hf", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "header", "empty"])
def test_damaged_files_are_refused_with_exit_2(hf_tiny, tmp_path, damage):
    good = (hf_tiny / "model.safetensors").read_bytes()
    bad = tmp_path / "w.safetensors"
    bad.write_bytes({"truncated": good[: len(good) // 2], "header": b"\x10" + good[1:], "empty": b""}[damage])
    r = zoo("convert", "wizardcoder-tiny", "--config", str(hf_tiny / "config.json"), "--input", str(bad),
            "--output", str(tmp_path / "out.safetensors"))
    assert r.returncode == 2 and "not a valid safetensors file" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # nothing half-written


def test_damaged_ckpt_is_refused(hf_tiny, tmp_path):
    cfg = load_config(hf_tiny / "config.json")
    convert(hf_tiny, tmp_path / "m.ckpt", cfg, to="ms", progress=False)
    data = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match="cannot read MindSpore checkpoint"):
        collect(tmp_path / "cut.ckpt", cfg)


MEASURE = """
import json, resource, sys
from wizardcoder_plugin.model.config import load_config
from wizardcoder_plugin.weights import convert
import tqdm, mindspore  # imported before the baseline: their memory is not the conversion's
def rss_mb(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
cfg = load_config(sys.argv[1] + "/config.json")
before = rss_mb()
open("/proc/self/clear_refs", "w").write("5")  # resets the high-water mark to the current RSS
convert(sys.argv[1], sys.argv[2], cfg, to=sys.argv[3], dtype=sys.argv[4], max_shard_size="64MB", progress=False)
peak = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"before": before, "peak": peak}))
"""


@pytest.mark.parametrize("to,suffix,dtype", [("ms", ".safetensors", "keep"), ("ms", ".ckpt", "fp16"),
                                             ("hf", "", "bf16")])
def test_conversion_memory_is_bounded_by_the_largest_tensor(tmp_path_factory, to, suffix, dtype):
    """A 280 MB checkpoint (largest tensor 9.4 MB) converts within the imports plus a few tensors: a converter that
    held the model would need the model's size again."""
    src = tmp_path_factory.getbasetemp() / "hf-280mb"
    if not src.exists():
        make_hf_checkpoint(src, vocab=1024, n_embd=768, n_layer=12, n_head=12, n_positions=512)
    total = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
    out = tmp_path_factory.mktemp("out") / f"converted{suffix}"
    r = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out), to, dtype], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    largest = 768 * 3072 * 4 / 2**20
    assert total > 250 and m["peak"] - m["before"] < 8 * largest + 40, (m, total)


def test_params_saved_as_safetensors_and_legacy_ckpt_load_back(tmp_path):
    """Training checkpoints: save_params writes safetensors (MindSpore's loader reads them); load_params reads them
    and the .ckpt files earlier versions wrote; fp16 parameters round-trip bit-exactly."""
    import mindspore as ms
    from mindspore import Parameter

    from wizardcoder_plugin.training.trainer import _checkpoint_file
    from wizardcoder_plugin.weights import load_params, save_params

    rng = np.random.default_rng(3)
    params = [Parameter(ms.Tensor(rng.standard_normal((4, 6)).astype(np.float32)), name="a.w"),
              Parameter(ms.Tensor(rng.standard_normal(5).astype(np.float16)), name="b.b"),
              Parameter(ms.Tensor(rng.standard_normal(3).astype(np.float32)).astype(ms.bfloat16), name="c.bf")]
    save_params(params, tmp_path / "model.safetensors")
    ms.save_checkpoint(params, str(tmp_path / "model.ckpt"))
    assert set(ms.load_checkpoint(str(tmp_path / "model.safetensors"), format="safetensors")) == \
        {"a.w", "b.b", "c.bf"}
    for name in ("model.safetensors", "model.ckpt"):
        fresh = [Parameter(ms.Tensor(np.zeros((4, 6), np.float32)), name="a.w"),
                 Parameter(ms.Tensor(np.zeros(5, np.float16)), name="b.b"),
                 Parameter(ms.Tensor(np.zeros(3, np.float32)).astype(ms.bfloat16), name="c.bf")]
        load_params(fresh, tmp_path / name)
        assert all(f.asnumpy().tobytes() == p.asnumpy().tobytes() for f, p in zip(fresh, params, strict=True))
    assert _checkpoint_file(tmp_path, "model").name == "model.safetensors"
    (tmp_path / "model.safetensors").unlink()
    assert _checkpoint_file(tmp_path, "model").name == "model.ckpt"
    with pytest.raises(InputError, match="needs"):
        load_params([Parameter(ms.Tensor(np.zeros((3, 6), np.float32)), name="a.w")], tmp_path / "model.ckpt")


def test_bf16_checkpoint_loads_into_each_precision_as_torch_converts_it(tmp_path):
    """A bf16 file (written by the safetensors library from torch) set into bf16 parameters (mapped, the same
    bits), fp16 and fp32 ones: each equal to torch's own conversion of the same tensor."""
    import mindspore as ms
    import torch
    from mindspore import Parameter
    from safetensors.torch import save_file

    from wizardcoder_plugin.weights.loading import param_tensor, set_param
    from wizardcoder_plugin.weights.safetensors_files import lazy_tensors

    ref = (torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 1e3).to(torch.bfloat16)
    save_file({"w": ref}, tmp_path / "bf16.safetensors")
    (_, t), = lazy_tensors(tmp_path / "bf16.safetensors")
    assert t.dtype == "BF16" and t.mapped is not None
    for ms_dtype, torch_dtype in ((ms.bfloat16, torch.bfloat16), (ms.float16, torch.float16),
                                  (ms.float32, torch.float32)):
        param = Parameter(ms.Tensor(np.zeros((64, 48), np.float32)).astype(ms_dtype), name="w")
        set_param(param, t)
        want = ref.to(torch_dtype)
        bits = torch.int16 if torch_dtype != torch.float32 else torch.int32
        assert param.dtype == ms_dtype
        assert np.array_equal(param_tensor(param).read().view(want.view(bits).numpy().dtype),
                              want.view(bits).numpy()), ms_dtype


def test_safetensors_layout_comes_from_the_library_and_tensors_map_the_file(tmp_path):
    """Every dtype the loader takes, a zero-size tensor and names out of alphabetical order, written by the
    library: each tensor read back equal, as a mapped view of the file where its offset is aligned."""
    from safetensors.numpy import save_file

    from wizardcoder_plugin.weights.safetensors_files import lazy_tensors

    rng = np.random.default_rng(0)
    want = {"z.w": rng.standard_normal((5, 3)).astype(np.float32), "a.b": rng.standard_normal(7).astype(np.float16),
            "m.bf": rng.standard_normal((2, 9)).astype(ml_dtypes.bfloat16), "empty": np.zeros((0, 4), np.float32),
            "ids": np.arange(6, dtype=np.int64).reshape(2, 3), "flags": np.array([True, False, True])}
    path = tmp_path / "mixed.safetensors"
    save_file(want, path)
    got = dict(lazy_tensors(path))
    assert set(got) == set(want)
    for name, arr in want.items():
        t = got[name]
        assert t.shape == arr.shape and np.array_equal(t.read(), arr), name
        if t.mapped is not None:
            view = t.mapped()
            assert isinstance(view, np.memmap) and np.array_equal(view, arr), name
    assert got["z.w"].mapped is not None and got["empty"].mapped is None


@pytest.mark.parametrize("damage", ["trailing bytes", "unsupported dtype"])
def test_safetensors_files_the_loader_cannot_take_are_refused(tmp_path, damage):
    from safetensors.numpy import save_file

    from wizardcoder_plugin.weights.safetensors_files import lazy_tensors

    path = tmp_path / "w.safetensors"
    if damage == "trailing bytes":
        save_file({"w": np.ones(4, np.float32)}, path)
        path.write_bytes(path.read_bytes() + b"\0" * 8)
        match = "not fully covered"
    else:
        save_file({"w": np.ones(4, np.uint16)}, path)
        match = "unsupported dtype U16"
    with pytest.raises(InputError, match=f"not a valid safetensors file: .*{match}"):
        list(lazy_tensors(path))


def test_a_write_flushed_as_it_goes_syncs_every_sync_every_bytes_and_reads_back_equal(tmp_path, monkeypatch):
    """Data-parallel checkpoints: what is written reaches the disk every `sync_every` bytes (so the closing fsync, and
    each `done` after a tensor, wait for no more than that), and the file is the same one."""
    from safetensors.numpy import load_file

    from wizardcoder_plugin.weights import safetensors_files

    want = {f"t{i}": np.full((256,), i, np.float32) for i in range(10)}  # 1 KiB each
    items = [(name, _lazy(arr, "F32")) for name, arr in want.items()]
    synced, done = [], []
    real = safetensors_files._datasync
    monkeypatch.setattr(safetensors_files, "_datasync", lambda fd: (synced.append(len(done)), real(fd)))
    safetensors_files.write_file(tmp_path / "a.safetensors", items, done=done.append, sync_every=3 * 1024)
    assert synced == [2, 5, 8]  # after tensors 3, 6 and 9, each before its `done`
    assert done == [1024] * 10
    safetensors_files.write_file(tmp_path / "b.safetensors", items)
    assert synced == [2, 5, 8]  # not asked: left to the kernel (and the closing fsync)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert all(np.array_equal(load_file(tmp_path / "a.safetensors")[k], v) for k, v in want.items())
