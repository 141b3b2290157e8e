"""The zoo hook implementations: WizardCoder's manifest, model cards and components. Light metadata only."""

from __future__ import annotations

from collections.abc import Callable

from registry_spec import hookimpl
from registry_spec.specs import ComponentInfo, ModelCard, PluginManifest

from . import __version__
from .model.config import PRESETS
from .model.memory import card_figures

PLUGIN_NAME = "wizardcoder"
FAMILY = "gpt_bigcode"
_C = "wizardcoder_plugin.components"
_EXPORT_EXTRA = "pip install 'wizardcoder-plugin[export]'"
MODELS = list(PRESETS)
# every component is tested end to end against the HF reference; they serve this plugin's models only (another
# GPTBigCode plugin's models would need this plugin's weight naming and presets)
COMPONENTS = [
    ComponentInfo(kind="config", name="wizardcoder", impl=f"{_C}:Config",
                  description="the card's preset, or an HF config.json / mindformers YAML"),
    ComponentInfo(kind="tokenizer", name="starcoder-bpe", impl=f"{_C}:Tokenizer",
                  description="StarCoder's byte-level BPE (tokenizers), WizardCoder's instruction template"),
    ComponentInfo(kind="model", name="mindspore", impl=f"{_C}:Model",
                  description="the GPTBigCode network on MindSpore: KV-cache engine, trainer, benchmark"),
    ComponentInfo(kind="converter", name="hf-to-ms", impl=f"{_C}:HF_TO_MS", source="hf", target="ms", default=True,
                  description="any checkpoint (HF folder or file, MindSpore .ckpt / .safetensors, the reference's "
                              "naming) to a MindSpore .safetensors or .ckpt"),
    ComponentInfo(kind="converter", name="ms-to-hf", impl=f"{_C}:MS_TO_HF", source="ms", target="hf",
                  description="any checkpoint to an HF folder (config.json + safetensors, sharded with an index)"),
    ComponentInfo(kind="exporter", name="mindir", impl=f"{_C}:MINDIR", default=True,
                  description="MindIR graphs run by MindSpore (prefill + decode, or one full graph)"),
    ComponentInfo(kind="exporter", name="onnx", impl=f"{_C}:ONNX", requires=_EXPORT_EXTRA,
                  description="ONNX graphs run by onnxruntime"),
    ComponentInfo(kind="exporter", name="lite", impl=f"{_C}:LITE",
                  requires=f"{_EXPORT_EXTRA} && python -m wizardcoder_plugin.export.lite_runtime setup",
                  description="MindSpore Lite (2.0.0 via a Python 3.7 worker, or an in-process mindspore_lite "
                              "with the Ascend config)"),
    ComponentInfo(kind="task", name="mbpp", impl=f"{_C}:MBPP", default=True,
                  description="MBPP (the reference's 500-problem test split), sandboxed, pass@k"),
    ComponentInfo(kind="task", name="humaneval", impl=f"{_C}:HUMANEVAL", description="HumanEval (164), pass@k"),
    ComponentInfo(kind="dataset", name="mindrecord", impl=f"{_C}:MindRecord",
                  description="instruction or text data tokenized into MindRecord rows for zoo train"),
]

_DESCRIPTIONS = {
    "wizardcoder-15b": "WizardCoder-15B-V1.0: StarCoder-15B instruction-tuned with Evol-Instruct",
    "wizardcoder-3b": "WizardCoder-3B-V1.0 (StarCoderBase-3B shape)",
    "wizardcoder-1b": "WizardCoder-1B-V1.0 (StarCoderBase-1B shape)",
    "wizardcoder-tiny": "a tiny WizardCoder-shaped model (random init) for demos, tests and CPUs",
}
_ALIASES = {"wizardcoder-15b": ["wizardcoder"], "wizardcoder-tiny": ["wizardcoder-test"]}


def cards() -> list[ModelCard]:
    return [
        ModelCard(name=name, aliases=_ALIASES.get(name, []), family=FAMILY, description=_DESCRIPTIONS[name],
                  architecture=cfg.summary(), params=cfg.num_parameters(), memory=card_figures(cfg),
                  context_length=cfg.n_positions, license="bigcode-openrail-m")
        for name, cfg in PRESETS.items()
    ]


@hookimpl
def zoo_plugin_manifest() -> PluginManifest:
    return PluginManifest(name=PLUGIN_NAME, version=__version__, requires_spec=">=2.0,<3",
                          description="WizardCoder / StarCoder (GPTBigCode) on MindSpore")


@hookimpl
def zoo_register_models(register: Callable[[ModelCard], None]) -> None:
    for card in cards():
        register(card)


@hookimpl
def zoo_register_components(register: Callable[[ComponentInfo], None]) -> None:
    for info in COMPONENTS:
        register(info.model_copy(update={"models": MODELS}))
