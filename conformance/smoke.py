"""Smoke checks: a tiny model on CPU through the host's generic commands over the plugin's components (minutes)."""

from __future__ import annotations

import json
import math

from registry_spec.errors import BackendUnavailableError
from registry_spec.specs import ConvertSpec, EvalSpec, ExportSpec, PredictSpec, PreprocessSpec, TrainSpec

from .checks import CheckFailed, CheckSkipped, Context, check, no_network


def _predict(ctx: Context, entry, **extra) -> list:  # noqa: ANN001
    fx = ctx.fixture(entry)
    spec = PredictSpec(model=entry.card.name, weights=fx.get("weights"), config=fx.get("config"),
                       tokenizer=fx.get("tokenizer"), prompt=["def add(a, b):", "print("], max_new_tokens=6,
                       template="none", **extra)
    return ctx.run("predict", entry, spec).completions


@check("smoke.predict_deterministic", "smoke", "predict")
def predict_deterministic(ctx: Context) -> None:
    """Greedy predict on local weights: no network, same tokens twice, bounded length, a valid finish reason."""
    entry = ctx.smallest("predict")
    with no_network():
        first, second = _predict(ctx, entry), _predict(ctx, entry)
    a, b = [c.token_ids for c in first], [c.token_ids for c in second]
    if a != b:
        raise CheckFailed("identical greedy token ids on repeat", f"{a} vs {b}")
    if any(not 0 < len(ids) <= 6 for ids in a):
        raise CheckFailed("1..6 generated tokens per prompt", str([len(i) for i in a]))
    ctx.cache["online_tokens"] = a


@check("smoke.tokenizer_round_trip", "smoke", "predict")
def tokenizer_round_trip(ctx: Context) -> None:
    """decode(encode(x)) == x on varied text; EOS and PAD ids are distinct and inside the vocabulary."""
    entry = ctx.smallest("predict")
    tok = ctx.handle(entry).tokenizer(ctx.fixture(entry).get("tokenizer"))
    for text in ("def f(x):\n\treturn x * 42  # 注释 😀", "  spaces\n\n", "SELECT 1;"):
        ids = tok.encode(text)
        if tok.decode(ids) != text:
            raise CheckFailed(f"round trip of {text!r}", repr(tok.decode(ids)))
    specials = {tok.eos_token_id, tok.pad_token_id}
    if len(specials) != 2 or not all(0 <= i < tok.vocab_size for i in specials):
        raise CheckFailed("distinct EOS/PAD ids inside the vocabulary", str(specials))


@check("smoke.convert_round_trip", "smoke", "convert")
def convert_round_trip(ctx: Context) -> None:
    """Each of the plugin's converters reads the fixture checkpoint with every parameter accounted for; a pair of
    converters there and back keeps every tensor."""
    entry = ctx.smallest("convert")
    fx = ctx.fixture(entry)
    out = ctx.workdir / "convert"
    h = ctx.handle(entry)
    for rc in ctx.mine(entry, "converter"):
        there = ctx.run("convert", entry, ConvertSpec(
            model=entry.card.name, input=fx["hf_checkpoint"], to=rc.info.target, config=fx.get("config"),
            output=out / f"{rc.info.name}{getattr(h.load(rc), 'suffix', '')}"))
        if there.parameters != entry.card.params:
            raise CheckFailed(f"{entry.card.params} parameters (the card) from {rc.qualified_name}",
                              str(there.parameters))
    mine = {(c.info.source, c.info.target): c for c in ctx.mine(entry, "converter")}
    pairs = [(a, b) for (a, b) in mine if (b, a) in mine]
    if not pairs:
        return
    rc, back_rc = mine[pairs[0]], mine[pairs[0][::-1]]
    first = out / f"trip{getattr(h.load(rc), 'suffix', '')}"
    native = ctx.run("convert", entry, ConvertSpec(model=entry.card.name, input=fx["hf_checkpoint"], output=first,
                                                   to=rc.info.target, config=fx.get("config")))
    back = ctx.run("convert", entry, ConvertSpec(
        model=entry.card.name, input=first, output=out / f"back{getattr(h.load(back_rc), 'suffix', '')}",
        to=back_rc.info.target, config=fx.get("config")))
    if native.tensors != back.tensors or native.parameters != back.parameters:
        raise CheckFailed("equal tensor and parameter counts both ways", f"{native} vs {back}")
    if native.parameters != entry.card.params:
        raise CheckFailed(f"{entry.card.params} parameters (the card)", str(native.parameters))


def _preprocessed(ctx: Context, entry) -> object:  # noqa: ANN001
    fx = ctx.fixture(entry)
    if "preprocessed" not in ctx.cache:
        ctx.cache["preprocessed"] = ctx.run("preprocess", entry, PreprocessSpec(
            model=entry.card.name, input=fx["instruction_data"], output=ctx.workdir / "data.mindrecord",
            tokenizer=fx.get("tokenizer"), seq_length=64, limit=16))
    return ctx.cache["preprocessed"]


@check("smoke.preprocess", "smoke", "preprocess")
def preprocess(ctx: Context) -> None:
    """Preprocessing the fixture's instruction data writes rows."""
    res = _preprocessed(ctx, ctx.smallest("preprocess"))
    if res.rows_written <= 0 or not res.output.exists():  # type: ignore[attr-defined]
        raise CheckFailed("rows written to an existing output", str(res))


@check("smoke.train", "smoke", "finetune")
def train(ctx: Context) -> None:
    """A 2-step finetune writes a checkpoint and reports a finite loss."""
    entry = ctx.smallest("finetune")
    fx = ctx.fixture(entry)
    data = _preprocessed(ctx, entry)
    res = ctx.run("train", entry, TrainSpec(
        model=entry.card.name, data=data.output, weights=fx.get("weights"), config=fx.get("config"),  # type: ignore
        output_dir=ctx.workdir / "train", max_steps=2, batch_size=2, seq_length=64))
    if not math.isfinite(res.final_loss) or not res.checkpoint.exists():
        raise CheckFailed("a finite loss and a checkpoint", str(res))


@check("smoke.export", "smoke", "export")
def export(ctx: Context) -> None:
    """Each exporter registered for the model (by any plugin) writes a manifest, and its runner's tokens equal
    online predict's."""
    entry = ctx.smallest("export")
    fx = ctx.fixture(entry)
    backends = [c.qualified_name for c in ctx.mine(entry, "exporter")]
    online = ctx.cache.get("online_tokens") or [c.token_ids for c in _predict(ctx, entry)]
    missing = []
    for backend in backends:
        out = ctx.workdir / f"export-{backend.replace(':', '-')}"
        try:
            res = ctx.run("export", entry, ExportSpec(model=entry.card.name, backend=backend,
                                                      weights=fx.get("weights"), config=fx.get("config"),
                                                      output_dir=out))
        except BackendUnavailableError as exc:  # a runtime this machine lacks is not a plugin defect
            missing.append(f"{backend}: {exc}")
            continue
        json.loads(res.manifest.read_text())
        got = [c.token_ids for c in _predict(ctx, entry, backend=backend, artifacts=out)]
        if got != online:
            raise CheckFailed(f"{backend} tokens equal to online", f"{got} vs {online}")
    if len(missing) == len(backends):
        raise CheckSkipped("no export runtime available: " + "; ".join(missing))


@check("smoke.eval", "smoke", "eval")
def evaluate(ctx: Context) -> None:
    """Each task registered for the model, on one problem with the fixture's weights, returns a consistent
    summary."""
    entry = ctx.smallest("eval")
    fx = ctx.fixture(entry)
    for task in ctx.mine(entry, "task"):
        _evaluate_one(ctx, entry, fx, task.qualified_name)


def _evaluate_one(ctx: Context, entry, fx: dict, task: str) -> None:  # noqa: ANN001
    res = ctx.run("eval", entry, EvalSpec(
        model=entry.card.name, task=task, weights=fx.get("weights"), config=fx.get("config"),
        tokenizer=fx.get("tokenizer"), limit=1, max_length=320,
        output_dir=ctx.workdir / f"eval-{task.replace(':', '-')}"))
    if res.n_problems != 1 or not 0 <= res.pass_at_1 <= 1 or res.passed not in (0, 1):
        raise CheckFailed("1 problem, 0 <= pass@1 <= 1", str(res))
