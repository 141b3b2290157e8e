"""WizardCoderAdapter: the zoo adapter methods, each a thin bridge from a spec to the implementation modules."""

from __future__ import annotations

from pathlib import Path

from registry_spec.adapter import BaseAdapter
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
    ModelCard,
    PredictResult,
    PredictSpec,
    PreprocessResult,
    PreprocessSpec,
    TrainResult,
    TrainSpec,
)

from .config import GPTBigCodeConfig, resolve_config

BUNDLED_TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class WizardCoderAdapter(BaseAdapter):
    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        self._generators: dict[tuple, object] = {}

    # ----------------------------------------------------------------------------------------------- helpers
    def config(self, path: Path | None) -> GPTBigCodeConfig:
        return resolve_config(self.card.name, path)

    def tokenizer(self, tokenizer: Path | None, weights: Path | None) -> object:
        """--tokenizer, else tokenizer files beside the weights, else the bundled StarCoder-family BPE (tiny only)."""
        from .runtime import weights_search_paths
        from .tokenizer import WizardCoderTokenizer

        if tokenizer is not None:
            return WizardCoderTokenizer.from_pretrained(tokenizer)
        candidates = [weights if weights is None or Path(weights).is_dir() else Path(weights).parent]
        candidates += weights_search_paths(self.card.name)
        for c in candidates:
            if c is not None and any((Path(c) / f).is_file() for f in _TOKENIZER_FILES):
                return WizardCoderTokenizer.from_pretrained(c)
        if self.card.name == "wizardcoder-tiny":
            return WizardCoderTokenizer.from_pretrained(BUNDLED_TOKENIZER)
        raise WeightsUnavailableError("tokenizer files (tokenizer.json or vocab.json + merges.txt)",
                                      [str(c) for c in candidates if c is not None],
                                      "pass --tokenizer DIR with your checkpoint's tokenizer files")

    def load_tokenizer(self, path: Path | None = None) -> object:
        """The conformance suite's tokenizer hook: encode/decode, eos_token_id, pad_token_id, vocab_size."""
        return self.tokenizer(path, None)

    def generator(self, spec: PredictSpec) -> tuple[object, object]:
        from .generate import Generator
        from .memory import check_inference
        from .runtime import build_model

        config = self.config(spec.config)
        key = (str(spec.weights), str(spec.config), spec.precision, str(spec.tokenizer))
        if key not in self._generators:
            tok = self.tokenizer(spec.tokenizer, spec.weights)
            if tok.vocab_size > config.vocab_size:  # type: ignore[attr-defined]
                raise InputError(f"the tokenizer has {tok.vocab_size} tokens but the model only "  # type: ignore
                                 f"{config.vocab_size}", "use the checkpoint's own tokenizer files")
            check_inference(config, spec.precision, spec.batch_size, "generating with this model")
            net = build_model(self.card.name, config, spec.weights, spec.precision, seed=spec.seed or 0)
            gen = Generator(net, tok.eos_token_id, tok.pad_token_id, max_batch=spec.batch_size)  # type: ignore
            self._generators[key] = (gen, tok)
        gen, tok = self._generators[key]
        gen.max_batch = spec.batch_size  # type: ignore[attr-defined]
        return gen, tok

    # ---------------------------------------------------------------------------------------------- commands
    def convert(self, spec: ConvertSpec) -> ConvertResult:
        from .weights import convert

        config = self.config(spec.config)
        if spec.config is None and spec.input.is_dir() and (spec.input / "config.json").is_file():
            config = resolve_config(self.card.name, spec.input / "config.json")
        return convert(spec.input, spec.output, config, to=spec.to, dtype=spec.dtype,
                       max_shard_size=spec.max_shard_size)

    def predict(self, spec: PredictSpec) -> PredictResult:
        from .predict import run_predict

        if spec.backend == "online":
            gen, tok = self.generator(spec)
            return run_predict(spec, gen, tok)
        from .export import BACKENDS
        from .exported import ExportedGenerator
        from .tokenizer import WizardCoderTokenizer

        if spec.backend not in BACKENDS:
            raise InputError(f"unknown backend {spec.backend!r}", f"use online or one of {', '.join(BACKENDS)}")
        if spec.artifacts is None:
            raise InputError(f"--backend {spec.backend} needs --artifacts DIR", "pass the --output-dir of zoo export")
        if not (spec.artifacts / "manifest.json").is_file():
            raise InputError(f"{spec.artifacts} is not an exported folder (no manifest.json)",
                             f"create one with `zoo export {spec.model} --backend {spec.backend} --output-dir DIR`")
        tok = WizardCoderTokenizer.from_pretrained(spec.tokenizer or spec.artifacts)
        gen = ExportedGenerator(spec.artifacts, spec.backend, tok.eos_token_id, tok.pad_token_id)
        return run_predict(spec, gen, tok)

    def export(self, spec: ExportSpec) -> ExportResult:
        from .export import run_export
        from .memory import check_inference, weight_bytes
        from .runtime import build_model, find_weights

        config = self.config(spec.config)
        tok = self.tokenizer(spec.tokenizer, spec.weights)
        # exporting serializes the weights once more
        check_inference(config, spec.precision, 1, "zoo export",
                        {"exported copy": weight_bytes(config, spec.precision)})
        net = build_model(self.card.name, config, spec.weights, spec.precision)
        return run_export(spec, net, config, tok, find_weights(self.card.name, spec.weights))

    def preprocess(self, spec: PreprocessSpec) -> PreprocessResult:
        from .preprocess import run_preprocess

        return run_preprocess(spec, self.tokenizer(spec.tokenizer, None))

    def train(self, spec: TrainSpec, callbacks: list | None = None) -> TrainResult:
        """Pretrain or finetune; `callbacks` (Python API) get each step's metrics row."""
        import sys

        from .run_config import resolve_train
        from .train import Trainer

        settings, config, notes = resolve_train(spec, self.card.name)
        for note in notes:
            print(f"note: {spec.config}: {note}", file=sys.stderr)
        return Trainer(settings, config, self.card.name, config.pad_token_id).train(callbacks)

    def evaluate(self, spec: EvalSpec) -> EvalResult:
        from .evaluate import run_eval

        def generator_for() -> tuple[object, object]:
            return self.generator(PredictSpec(model=spec.model, weights=spec.weights, config=spec.config,
                                              tokenizer=spec.tokenizer, batch_size=spec.batch_size * spec.n_samples))

        return run_eval(spec, generator_for)

    def bench(self, spec: BenchSpec) -> BenchResult:
        import sys

        from .bench import run_bench
        from .memory import check_inference
        from .runtime import build_model, find_weights

        config = self.config(spec.config)
        tok = self.tokenizer(None, spec.weights)
        check_inference(config, "fp32", max(spec.batch_sizes), "zoo bench")
        net = build_model(self.card.name, config, spec.weights)
        return run_bench(spec, self.card.name, config, net, tok, find_weights(self.card.name, spec.weights),
                         lambda line: print(line, file=sys.stderr))

    def conformance_fixture(self, workdir: Path) -> dict[str, Path]:
        """Tiny local assets for the conformance smoke tier: a seeded random checkpoint in HF layout, the bundled
        tokenizer, and a few instruction rows."""
        import json

        from .runtime import save_random_init
        from .weights import convert

        workdir.mkdir(parents=True, exist_ok=True)
        config = self.config(None)
        ckpt = save_random_init(self.card.name, config, workdir / "init.safetensors")
        hf_dir = workdir / "hf"
        convert(ckpt, hf_dir, config, to="hf", progress=False)
        data = workdir / "instructions.json"
        data.write_text(json.dumps([{"instruction": f"Return {i} plus one.", "input": "",
                                     "output": f"def f():\n    return {i} + 1"} for i in range(16)]))
        return {"weights": hf_dir, "hf_checkpoint": hf_dir, "config": hf_dir / "config.json",
                "tokenizer": BUNDLED_TOKENIZER, "instruction_data": data}
