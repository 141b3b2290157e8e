"""WizardCoder in mindformers' registry, so `MindFormerRegister` / `build_network`-style configs can construct it:
`WizardCoderConfig` (CONFIG), `WizardCoderLMHeadModel` (MODELS), `WizardCoderTokenizer` (TOKENIZER) — the
reference's class names, backed by this plugin's network and tokenizer.

Importing mindformers costs seconds and writes logs, so nothing here runs at CLI start: `register()` is called
explicitly, or automatically when a model is built in a process that has already imported mindformers. An
existing registration under the same name (e.g. the reference's research code) is never overwritten.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

NAMES = ("WizardCoderConfig", "WizardCoderLMHeadModel", "WizardCoderTokenizer")


def _quiet_mindformers_logs() -> None:
    logs = os.path.join(tempfile.gettempdir(), f"zoo-mindformers-{os.getuid()}")
    os.environ.setdefault("LOCAL_DEFAULT_PATH", logs)  # its default is ./output under the user's cwd
    os.environ.setdefault("LOG_MF_PATH", os.path.join(logs, "log"))


def register() -> dict[str, str]:
    """Register the three classes; returns name -> 'registered' | 'kept existing'."""
    _quiet_mindformers_logs()
    import mindspore as ms
    from mindformers import PretrainedConfig, PreTrainedModel
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    from mindspore import ops

    from ..model.config import GPTBigCodeConfig, from_mindformers_dict
    from ..text.tokenizer import WizardCoderTokenizer as _Tokenizer

    class WizardCoderConfig(PretrainedConfig):
        """mindformers config with the reference's `model_config` keys; `.gpt_bigcode` is this plugin's config."""

        model_type = "wizardcoder"

        def __init__(self, checkpoint_name_or_path: str = "", **kwargs: object) -> None:
            keys = {k: kwargs.pop(k) for k in list(kwargs) if k in _MODEL_KEYS}
            super().__init__(**kwargs)
            self.checkpoint_name_or_path = checkpoint_name_or_path
            self.gpt_bigcode: GPTBigCodeConfig = from_mindformers_dict(keys, "WizardCoderConfig") if keys \
                else GPTBigCodeConfig()

    class WizardCoderLMHeadModel(PreTrainedModel):
        """This plugin's GPTBigCode network; construct(input_ids[, attention_mask]) -> fp32 logits [B,S,V]."""

        config_class = WizardCoderConfig
        base_model_prefix = "transformer"

        def __init__(self, config: WizardCoderConfig, precision: str = "fp32") -> None:
            super().__init__(config, auto_prefix=False)
            from ..model.modeling import GPTBigCodeForCausalLM

            self.network = GPTBigCodeForCausalLM(config.gpt_bigcode, precision)
            if config.checkpoint_name_or_path:
                from ..weights import collect, load_into

                load_into(self.network, collect(Path(config.checkpoint_name_or_path), config.gpt_bigcode))

        def construct(self, input_ids, attention_mask=None):  # noqa: ANN001, ANN201 - mindformers' signature
            b, s = input_ids.shape
            positions = ops.arange(0, s, dtype=ms.int32).reshape(1, s).broadcast_to((b, s))
            mask = ops.ones((b, s), ms.int32) if attention_mask is None else attention_mask
            return self.network(input_ids.astype(ms.int32), positions, mask)

    class WizardCoderTokenizer:
        """Callable like mindformers/HF tokenizers: tok(text)['input_ids'], encode, decode."""

        def __init__(self, vocab_file: str = "", merge_file: str = "", tokenizer_dir: str = "",
                     **_: object) -> None:
            if tokenizer_dir:
                self._tok = _Tokenizer.from_pretrained(tokenizer_dir)
            else:
                self._tok = _Tokenizer.from_vocab_merges(vocab_file, merge_file)
            self.eos_token_id, self.pad_token_id = self._tok.eos_token_id, self._tok.pad_token_id

        def __call__(self, text: str | list[str], **_: object) -> dict:
            ids = self._tok.encode(text) if isinstance(text, str) else self._tok.encode_batch(text)
            return {"input_ids": ids}

        def encode(self, text: str) -> list[int]:
            return self._tok.encode(text)

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    status = {}
    for cls, kind in ((WizardCoderConfig, MindFormerModuleType.CONFIG),
                      (WizardCoderLMHeadModel, MindFormerModuleType.MODELS),
                      (WizardCoderTokenizer, MindFormerModuleType.TOKENIZER)):
        if MindFormerRegister.is_exist(kind, cls.__name__):
            status[cls.__name__] = "kept existing"
        else:
            MindFormerRegister.register_cls(cls, module_type=kind)
            status[cls.__name__] = "registered"
    return status


_MODEL_KEYS = {
    "seq_length", "n_position", "vocab_size", "embedding_size", "hidden_size", "num_layers", "num_heads",
    "expand_ratio", "hidden_act", "dropout_prob", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "initializer_range", "eos_token", "pad_token",
}


def register_if_loaded() -> None:
    """Register when the process already uses mindformers (never imports it just for this)."""
    if "mindformers" in sys.modules and not getattr(register_if_loaded, "done", False):
        register()
        register_if_loaded.done = True  # type: ignore[attr-defined]
