"""mindformers' registry builds WizardCoder (config, model, tokenizer) and its logits equal HF's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import BUNDLED_TOKENIZER

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys, numpy as np
import mindspore as ms
from mindspore import Tensor
ms.set_context(mode=ms.GRAPH_MODE)
import mindformers  # a process that uses mindformers: building any model registers WizardCoder
from mindformers.tools.register import MindFormerModuleType as T, MindFormerRegister as R
from wizardcoder_plugin.compat.mindformers import register
from wizardcoder_plugin.model.runtime import build_model
from wizardcoder_plugin.model.config import PRESETS
assert not R.is_exist(T.MODELS, "WizardCoderLMHeadModel")
build_model("wizardcoder-tiny", PRESETS["wizardcoder-tiny"], None)
assert R.is_exist(T.MODELS, "WizardCoderLMHeadModel")
status = register()  # a second registration keeps the first
hf_dir, tok_dir = sys.argv[1], sys.argv[2]
cfg = R.get_instance_from_cfg({"type": "WizardCoderConfig", "seq_length": 64, "n_position": 256,
    "vocab_size": 49153, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "expand_ratio": 4,
    "hidden_act": "gelu_pytorch_tanh", "pad_token": 49152, "checkpoint_name_or_path": hf_dir}, T.CONFIG)
model = R.get_cls(T.MODELS, "WizardCoderLMHeadModel")(cfg)
tok = R.get_instance_from_cfg({"type": "WizardCoderTokenizer", "tokenizer_dir": tok_dir}, T.TOKENIZER)
ids = tok("def add(a, b):\n    return a + b")["input_ids"]
logits = model(Tensor(np.array([ids], np.int32))).asnumpy()
print(json.dumps({"status": status, "ids": ids, "logits": logits.tolist()}))
"""


def test_mindformers_registry_builds_wizardcoder(tmp_path, hf_tiny, hf_model):
    import numpy as np
    import torch

    r = subprocess.run([sys.executable, "-c", SCRIPT, str(hf_tiny), str(BUNDLED_TOKENIZER)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == {n: "kept existing" for n in ("WizardCoderConfig", "WizardCoderLMHeadModel",
                                                           "WizardCoderTokenizer")}
    with torch.no_grad():
        ref = hf_model(torch.tensor([out["ids"]])).logits.numpy()
    assert np.abs(np.array(out["logits"]) - ref).max() < 1e-4
    # register() imports mindformers itself without its logs landing in the cwd
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    r = subprocess.run([sys.executable, "-c", "from wizardcoder_plugin.compat.mindformers import register; "
                        "print(register())"], capture_output=True, text=True, cwd=fresh, timeout=600)
    assert r.returncode == 0 and "'WizardCoderLMHeadModel': 'registered'" in r.stdout, r.stderr[-2000:]
    assert list(fresh.iterdir()) == []
