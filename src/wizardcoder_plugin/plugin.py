"""The zoo hook implementations: WizardCoder's manifest, model cards and exporters. Light metadata only."""

from __future__ import annotations

from collections.abc import Callable

from registry_spec import hookimpl
from registry_spec.specs import ExporterInfo, ModelCard, PluginManifest

from . import __version__
from .config import PRESETS
from .memory import card_figures

PLUGIN_NAME = "wizardcoder"
ADAPTER = "wizardcoder_plugin.adapter:WizardCoderAdapter"
# capabilities are listed only once they work end to end (tested against the HF reference)
CAPABILITIES = ["convert", "preprocess", "train", "finetune", "predict", "export", "eval", "bench"]
EXPORTERS = [
    ExporterInfo(backend="mindir", description="MindIR graphs run by MindSpore (prefill + decode, or one full graph)"),
    ExporterInfo(backend="onnx", description="ONNX graphs run by onnxruntime",
                 requires="pip install 'wizardcoder-plugin[export]'"),
    ExporterInfo(backend="lite", description="MindSpore Lite (2.0.0 via a Python 3.7 worker, or an in-process "
                 "mindspore_lite with the Ascend config)",
                 requires="pip install 'wizardcoder-plugin[export]' && "
                          "python -m wizardcoder_plugin.lite_runtime setup"),
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
        ModelCard(
            name=name,
            aliases=_ALIASES.get(name, []),
            family="gpt_bigcode",
            description=_DESCRIPTIONS[name],
            architecture=cfg.summary(),
            params=cfg.num_parameters(),
            memory=card_figures(cfg),
            context_length=cfg.n_positions,
            capabilities=list(CAPABILITIES),
            adapter=ADAPTER,
            license="bigcode-openrail-m",
        )
        for name, cfg in PRESETS.items()
    ]


@hookimpl
def zoo_plugin_manifest() -> PluginManifest:
    return PluginManifest(name=PLUGIN_NAME, version=__version__, requires_spec=">=1.0,<2",
                          description="WizardCoder / StarCoder (GPTBigCode) on MindSpore")


@hookimpl
def zoo_register_models(register: Callable[[ModelCard], None]) -> None:
    for card in cards():
        register(card)


@hookimpl
def zoo_register_exporters(register: Callable[[ExporterInfo], None]) -> None:
    for info in EXPORTERS:
        register(info)
