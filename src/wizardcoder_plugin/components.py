"""WizardCoder's zoo components (the host's protocols in `registry_spec.components`), each a thin bridge from a
spec to the implementation modules. Importing this module is cheap: every heavy import is inside a method."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry_spec.errors import InputError, WeightsUnavailableError
from registry_spec.specs import (
    BenchResult,
    BenchSpec,
    ConvertResult,
    ConvertSpec,
    EvalResult,
    EvalSpec,
    ExportResult,
    ExportSpec,
    PredictSpec,
    PreprocessResult,
    PreprocessSpec,
    TrainSpec,
)

BUNDLED_TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class Config:
    """The card's preset, or an HF config.json / mindformers YAML (`--config`)."""

    def resolve(self, model: Any, path: Path | None) -> Any:
        from .model.config import resolve_config

        return resolve_config(model.name, path)

    def reference(self, architecture: Any) -> dict[str, Any]:
        return architecture.to_hf_dict() | {"seq_length": architecture.seq_length}


def architecture(model: Any, config: Path | None, weights: Path | None) -> Any:
    """`--config`, else the checkpoint folder's config.json, else the card's preset."""
    from .model.config import config_file

    return model.config(config_file(config, weights))


class Tokenizer:
    """StarCoder's BPE: `--tokenizer`, else files beside the weights, else the bundled one (tiny only)."""

    def load(self, model: Any, path: Path | None, weights: Path | None) -> Any:
        from .model.runtime import weights_search_paths
        from .text.tokenizer import WizardCoderTokenizer

        if path is not None:
            return WizardCoderTokenizer.from_pretrained(path)
        candidates = [weights if weights is None or Path(weights).is_dir() else Path(weights).parent]
        candidates += weights_search_paths(model.name)
        for c in candidates:
            if c is not None and any((Path(c) / f).is_file() for f in _TOKENIZER_FILES):
                return WizardCoderTokenizer.from_pretrained(c)
        if model.name == "wizardcoder-tiny":
            return WizardCoderTokenizer.from_pretrained(BUNDLED_TOKENIZER)
        hint = "pass --tokenizer DIR with your checkpoint's tokenizer files"
        if weights is None:  # the usual cause: no checkpoint given at all, and its folder holds the tokenizer
            hint = (f"pass --weights with the {model.name} checkpoint folder (an HF download holds its "
                    "tokenizer.json), or " + hint.removeprefix("pass "))
        raise WeightsUnavailableError("tokenizer files (tokenizer.json or vocab.json + merges.txt)",
                                      [str(c) for c in candidates if c is not None], hint)

    def format_prompt(self, text: str, template: str, extra: str = "") -> str:
        from .text.templates import apply_template

        return apply_template(text, template, extra)

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        from .text.templates import chat_prompt

        return chat_prompt(messages)

    def format_infill(self, prefix: str, suffix: str) -> str:
        from .text.templates import infill_prompt

        return infill_prompt(prefix, suffix)


class Model:
    """The MindSpore GPTBigCode network: the online engine, the trainer, the weights, the benchmark."""

    def engine(self, model: Any, spec: PredictSpec, tokenizer: Any) -> Any:
        from .generation.online import Generator
        from .model.memory import check_inference
        from .model.runtime import build_model

        config = architecture(model, spec.config, spec.weights)
        if tokenizer.vocab_size > config.vocab_size:
            raise InputError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{config.vocab_size}", "use the checkpoint's own tokenizer files")
        check_inference(config, spec.precision, spec.batch_size, "generating with this model")
        net = build_model(model.name, config, spec.weights, spec.precision, seed=spec.seed or 0)
        return Generator(net, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch=spec.batch_size)

    def trainer(self, model: Any, spec: TrainSpec) -> Any:
        from .training.run_config import resolve_train
        from .training.trainer import Trainer

        settings, config, notes = resolve_train(spec, model.name)
        for note in notes:
            print(f"note: {spec.config}: {note}", file=sys.stderr)
        return Trainer(settings, config, model.name, config.pad_token_id)

    def state_dict(self, model: Any, weights: Path | None, config: Path | None) -> Mapping[str, Any]:
        """fp32 numpy arrays in HF naming (the tied head omitted): the checkpoint's, or the seeded random init."""
        from .model.runtime import build_model, find_weights
        from .weights import collect
        from .weights.tensors import as_dtype

        cfg = architecture(model, config, weights)
        source = find_weights(model.name, weights)
        if source is None:
            net = build_model(model.name, cfg, None)
            return {p.name: p.asnumpy() for p in net.get_parameters()}
        return {n: as_dtype(t.read(), t.dtype, "F32") for n, t in collect(source, cfg).items()}

    def bench(self, model: Any, spec: BenchSpec) -> BenchResult:
        from .generation.bench import check_spec, run_bench
        from .model.memory import check_inference
        from .model.runtime import build_model, find_weights

        config = architecture(model, spec.config, spec.weights)
        check_spec(spec, model, config)
        tok = model.tokenizer(None, spec.weights)
        check_inference(config, "fp32", max(spec.batch_sizes), "zoo bench")
        net = build_model(model.name, config, spec.weights)
        return run_bench(spec, model, config, net, tok, find_weights(model.name, spec.weights),
                         lambda line: print(line, file=sys.stderr))

    def fixture(self, model: Any, workdir: Path) -> dict[str, Path]:
        """A seeded random checkpoint in HF layout, the bundled tokenizer, and a few instruction rows."""
        import json

        from .model.runtime import save_random_init
        from .weights import convert

        workdir.mkdir(parents=True, exist_ok=True)
        config = model.config(None)
        ckpt = save_random_init(model.name, config, workdir / "init.safetensors")
        hf_dir = workdir / "hf"
        convert(ckpt, hf_dir, config, to="hf", progress=False)
        data = workdir / "instructions.json"
        data.write_text(json.dumps([{"instruction": f"Return {i} plus one.", "input": "",
                                     "output": f"def f():\n    return {i} + 1"} for i in range(16)]))
        return {"weights": hf_dir, "hf_checkpoint": hf_dir, "config": hf_dir / "config.json",
                "tokenizer": BUNDLED_TOKENIZER, "instruction_data": data}


class Converter:
    """Any checkpoint layout this plugin reads (HF, MindSpore, the reference's naming) to `target`: 'ms' (a
    MindSpore .safetensors or .ckpt) or 'hf' (an HF folder)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.suffix = ".safetensors" if target == "ms" else ""  # what an output path ends in (a folder for hf)

    def accepts(self, path: Path) -> bool:
        return Path(path).exists()

    def convert(self, model: Any, spec: ConvertSpec) -> ConvertResult:
        from .weights import convert

        return convert(spec.input, spec.output, architecture(model, spec.config, spec.input), to=self.target,
                       dtype=spec.dtype, max_shard_size=spec.max_shard_size)


HF_TO_MS, MS_TO_HF = Converter("ms"), Converter("hf")


class Exporter:
    """MindIR, ONNX or MindSpore Lite graphs in a folder with a manifest; the runner loads them as an Engine."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def export(self, model: Any, spec: ExportSpec, network: Any = None) -> ExportResult:
        """`network`: the spec's weights already loaded (`zoo bench` exports one network per batch size)."""
        from registry_spec.atomic import check_replaceable

        from .export.writer import check_length, earlier_export, run_export
        from .model.memory import check_inference, weight_bytes
        from .model.runtime import build_model, find_weights

        check_replaceable(spec.output_dir, earlier_export)  # before the weights load
        config = architecture(model, spec.config, spec.weights)
        check_length(spec, config)
        tok = model.tokenizer(spec.tokenizer, spec.weights)
        # exporting serializes the weights once more
        check_inference(config, spec.precision, 1, "zoo export",
                        {"exported copy": weight_bytes(config, spec.precision)})
        if network is None:
            network = build_model(model.name, config, spec.weights, spec.precision)
        return run_export(spec, network, config, tok, find_weights(model.name, spec.weights))

    def runner(self, model: Any, folder: Path) -> Any:
        from .export.runner import ExportedEngine

        return ExportedEngine(folder, self.backend)


MINDIR, ONNX, LITE = Exporter("mindir"), Exporter("onnx"), Exporter("lite")


class Task:
    """MBPP or HumanEval: generation with resume, sandboxed execution, pass@k."""

    def __init__(self, name: str) -> None:
        self.name = name

    def evaluate(self, model: Any, spec: EvalSpec) -> EvalResult:
        from .evaluation.tasks import run_eval

        def generator_for() -> tuple[object, object]:
            return model.generator(PredictSpec(model=spec.model, weights=spec.weights, config=spec.config,
                                               tokenizer=spec.tokenizer, batch_size=spec.batch_size * spec.n_samples))

        return run_eval(spec, generator_for)


MBPP, HUMANEVAL = Task("mbpp"), Task("humaneval")


class MindRecord:
    """Instruction or plain-text data tokenized into MindRecord rows for `zoo train`."""

    def preprocess(self, model: Any, spec: PreprocessSpec, tokenizer: Any) -> PreprocessResult:
        from .training.preprocess import run_preprocess

        return run_preprocess(spec, tokenizer)
