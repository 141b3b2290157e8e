"""The MindSpore network's logits equal transformers' GPTBigCodeForCausalLM on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from wizardcoder_plugin.model.config import load_config
from wizardcoder_plugin.model.runtime import build_model, init_mindspore


def hf_logits(path, ids, mask):
    import torch
    from transformers import GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()


def ms_logits(path, ids, mask):
    ms = init_mindspore()
    cfg = load_config(path / "config.json")
    net = build_model("custom", cfg, path)
    pos = np.tile(np.arange(ids.shape[1], dtype=np.int32), (ids.shape[0], 1))
    return net(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(mask)).asnumpy()


@pytest.mark.parametrize("fixture", ["hf_tiny", "hf_mha"])
def test_logits_match_hf_with_right_padded_batch(fixture, request):
    path = request.getfixturevalue(fixture)
    cfg = load_config(path / "config.json")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size - 1, size=(3, 19)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = cfg.pad_token_id
    ours, ref = ms_logits(path, ids, mask), hf_logits(path, ids, mask)
    assert ours.shape == ref.shape == (3, 19, cfg.vocab_size)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4
    assert np.abs(ours - ref).max() <= 1e-4  # padded positions too: the masking semantics are HF's


@pytest.mark.parametrize("kernels", ["mindspore", "native"])
@pytest.mark.parametrize("fixture", ["hf_tiny", "hf_mha"])
def test_prefill_and_decode_cells_equal_full_forward(fixture, kernels, request):
    """The cached path (prefill, then decode steps writing the caches in place) against HF's full forward, for
    multi-query and multi-head caches (tanh and exact GELU), on MindSpore's kernels and on the native decode
    layers (which write the caches themselves); the greedy decode graph returns the argmax of the same logits, on
    native kernels also through the screened int8 head."""
    ms = init_mindspore()
    from wizardcoder_plugin.kernels import availability, native_kernels
    from wizardcoder_plugin.kernels.cells import decode_cell, prefill_cell
    from wizardcoder_plugin.model.inference import KVCache

    if kernels == "native" and not availability()[0]:
        pytest.skip(f"native kernels unavailable here: {availability()[1]}")
    native = native_kernels() if kernels == "native" else None
    ckpt = request.getfixturevalue(fixture)
    cfg = load_config(ckpt / "config.json")
    net = build_model("custom", cfg, ckpt)
    rng = np.random.default_rng(1)
    full = rng.integers(0, cfg.vocab_size - 1, size=(2, 12)).astype(np.int32)
    lengths = np.array([9, 6], dtype=np.int32)
    cache = KVCache(cfg, 2, 64, ms.float32, f"test-{fixture}-{kernels}")
    prefill, decode = prefill_cell(net, cache, native=native), decode_cell(net, cache, native=native)
    greedy = decode_cell(net, cache, greedy=True, native=native)
    screened = None
    if native is not None:
        from wizardcoder_plugin.kernels.head import greedy_tables

        q, info = greedy_tables(net.transformer.wte.weight.asnumpy(), native)
        screen = (ms.Parameter(ms.Tensor(q), name=f"sq-{fixture}"), ms.Parameter(ms.Tensor(info), name=f"si-{fixture}"))
        screened = decode_cell(net, cache, greedy=True, native=native, screen=screen)
        assert screened.screen is not None
    prompt = np.where(np.arange(12)[None] < lengths[:, None], full, cfg.pad_token_id).astype(np.int32)
    got = [prefill(ms.Tensor(prompt[:, :10]), ms.Tensor(lengths)).asnumpy()]
    picked = []
    pos = lengths.copy()
    for _ in range(3):
        tok = ms.Tensor(full[np.arange(2), pos].reshape(2, 1))
        picked.append(greedy(tok, ms.Tensor(pos)).asnumpy())  # writes the same slot the logits graph rewrites
        if screened is not None:
            assert (screened(tok, ms.Tensor(pos)).asnumpy() == picked[-1]).all()
        got.append(decode(tok, ms.Tensor(pos)).asnumpy())
        pos = pos + 1
    ref = hf_logits(ckpt, full, np.ones_like(full))
    for step, logits in enumerate(got):
        expect = ref[np.arange(2), lengths - 1 + step]
        assert np.abs(logits - expect).max() <= 1e-4, step
        if step:
            assert picked[step - 1].dtype == np.int64
            assert (picked[step - 1] == expect.argmax(-1)).all(), step


def test_fp16_logits_match_hf_fp16(hf_tiny):
    """fp16 weights and matmuls, LayerNorm and softmax in fp32, against HF's fp16 model on the same weights."""
    import torch
    from transformers import GPTBigCodeForCausalLM

    ms = init_mindspore()
    cfg = load_config(hf_tiny / "config.json")
    net = build_model("custom", cfg, hf_tiny, precision="fp16")
    rng = np.random.default_rng(2)
    ids = rng.integers(0, cfg.vocab_size - 1, size=(2, 16)).astype(np.int32)
    pos = np.tile(np.arange(16, dtype=np.int32), (2, 1))
    ours = net(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(np.ones_like(ids))).asnumpy()
    model = GPTBigCodeForCausalLM.from_pretrained(hf_tiny, torch_dtype=torch.float16).eval()
    with torch.no_grad():
        ref = model(torch.tensor(ids).long()).logits.float().numpy()
    fp32 = hf_logits(hf_tiny, ids, np.ones_like(ids))
    assert net.transformer.h[0].attn.c_attn.weight.dtype == ms.float16
    # both fp16 engines sit at fp16 rounding distance from fp32 and from each other (observed ≈1.7e-2)
    assert np.abs(ref - fp32).max() < 5e-2
    assert np.abs(ours - ref).max() < 5e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95
