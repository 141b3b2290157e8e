"""`zoo bench`: the reference's inference table (tokens/s over batch size x total length) for the online model and
exported backends, optionally side by side with HF transformers on the same weights, prompts and machine.

Per grid point and engine: a warm-up run (compile time reported separately), then `repeats` timed runs, engines
interleaved, medians reported. Generation is greedy with EOS disabled, so every row generates exactly
total_length - prompt_length tokens: the reference's counting and the honest count (no tokens after EOS) agree;
`tokens_per_s_e2e_with_tokenizer` adds encoding the prompts and decoding the outputs.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from registry_spec.atomic import write_json, write_text
from registry_spec.errors import BackendUnavailableError, InputError
from registry_spec.specs import BenchResult, BenchRow, BenchSpec, ExportSpec

NO_EOS = -1


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, min(vocab, 49152) - 1, size=length).tolist() for _ in range(batch)]


class _Ours:
    """Online graphs or an exported folder, through the shared decoding loop."""

    def __init__(self, gen: Any, tok: Any) -> None:
        self.gen, self.tok = gen, tok

    def run(self, prompts: list[list[int]], new: int) -> dict:
        from registry_spec.generation import GenerationConfig, generate

        self.gen.max_batch = len(prompts)
        t0 = time.perf_counter()
        outs = generate(self.gen, prompts, GenerationConfig(max_new_tokens=new), NO_EOS,
                        self.tok.pad_token_id)
        total = time.perf_counter() - t0
        picked = self.gen.decode_kernels(len(prompts))
        return {"total_s": total, "prefill_ms": outs[0].prefill_ms, "decode_tokens_per_s": outs[0].decode_tokens_per_s,
                "generated": sum(len(o.token_ids) for o in outs), "outputs": [o.token_ids for o in outs], **picked}


class _HF:
    """transformers' GPTBigCodeForCausalLM (PyTorch eager), the reference engine, in a worker process of its own.

    Each engine gets a process, as a user runs it: in one process, PyTorch's and MindSpore's thread pools and
    allocators slow each other down (MindSpore's decode ran markedly slower once HF had run
    beside it). Runs stay interleaved in time with ours, on the same machine, prompts and weights."""

    def __init__(self, hf_dir: Path) -> None:
        import multiprocessing as mp

        _check_hf_installed()
        ctx = mp.get_context("spawn")  # a fresh interpreter: no MindSpore state in the reference's process
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hf_worker, args=(str(hf_dir), child, reference_threads()), daemon=True)
        self.proc.start()
        child.close()
        self._reply()  # the model is loaded

    def _reply(self) -> dict:
        try:
            msg = self.conn.recv()
        except EOFError:
            raise BackendUnavailableError("hf-transformers", "the reference worker process died",
                                          "run again; check memory (the reference holds its own copy of the "
                                          "weights)") from None
        if "error" in msg:
            raise BackendUnavailableError("hf-transformers", msg["error"], "check the HF checkpoint folder")
        return msg

    def run(self, prompts: list[list[int]], new: int) -> dict:
        self.conn.send((prompts, new))
        return self._reply()

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def reference_threads() -> int:
    """The thread count for the reference engine: the user's OMP_NUM_THREADS, else every CPU this process may
    use (torch's default). Read from Python's start-up copy of the environment: MindSpore's runtime sets
    OMP_NUM_THREADS=1 at the C level, which a spawned child would otherwise inherit (a 1-thread reference)."""
    user = os.environ.get("OMP_NUM_THREADS", "")
    return int(user) if user.isdigit() and int(user) > 0 else len(os.sched_getaffinity(0))


def reference_torch(threads: int) -> Any:
    """torch, imported in a reference worker process and set to `threads` (see `reference_threads`)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    return torch


def _hf_worker(hf_dir: str, conn: Any, threads: int) -> None:
    try:
        torch = reference_torch(threads)
        from transformers import GPTBigCodeForCausalLM

        model = GPTBigCodeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    except Exception as e:  # reported to the parent, which raises it with a fix
        conn.send({"error": f"{type(e).__name__}: {e}"})
        return
    conn.send({"ready": True})
    while (job := conn.recv()) is not None:
        result = _hf_greedy(torch, model, *job)
        result["peak_rss_mb"] = _peak_rss_mb()
        result["threads"] = torch.get_num_threads()
        conn.send(result)


def _hf_greedy(torch: Any, model: Any, prompts: list[list[int]], new: int) -> dict:
    """Greedy with the KV cache, as a minimal loop over the model's forward (no `generate` overhead): prefill
    and decode timed separately, like ours."""
    ids = torch.tensor(prompts, dtype=torch.long)
    outputs = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - t0
        past = out.past_key_values
        outputs.append(token)
        t1 = time.perf_counter()
        for _ in range(new - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            outputs.append(token)
        decode_s = time.perf_counter() - t1
    return {"total_s": prefill + decode_s, "prefill_ms": prefill * 1e3,
            "decode_tokens_per_s": ids.shape[0] * (new - 1) / decode_s if new > 1 else 0.0,
            "generated": ids.shape[0] * new, "outputs": torch.cat(outputs, dim=1).tolist()}


_ENGINE_KEYS = ("threads", "kernels", "kernel_threads", "greedy_head", "head_layout")  # what an engine ran on


def _median_row(backend: str, batch: int, length: int, runs: list[dict], warmup_s: float, tok: Any,
                prompt_len: int) -> BenchRow:
    total = statistics.median(r["total_s"] for r in runs)
    generated = runs[0]["generated"]
    t0 = time.perf_counter()
    tok.encode_batch(["x " * prompt_len] * batch)
    for ids in runs[0]["outputs"]:
        tok.decode(ids)
    tok_s = time.perf_counter() - t0
    return BenchRow(
        backend=backend, batch_size=batch, total_length=length,
        decode_tokens_per_s=round(statistics.median(r["decode_tokens_per_s"] for r in runs), 2),
        prefill_ms=round(statistics.median(r["prefill_ms"] for r in runs), 2),
        extra={"prompt_length": prompt_len, "generated_tokens": generated,
               "tokens_per_s_e2e": round(generated / total, 2),
               "tokens_per_s_e2e_with_tokenizer": round(generated / (total + tok_s), 2),
               "tokens_per_s_reference_count": round(batch * (length - prompt_len) / total, 2),
               "prefill_tokens_per_s": round(batch * prompt_len / (statistics.median(
                   r["prefill_ms"] for r in runs) / 1e3), 1),
               "warmup_s": round(warmup_s, 3), "repeats": len(runs),
               # the reference's own process; ours: this process (every online/exported engine so far)
               "peak_rss_mb_process": round(runs[-1].get("peak_rss_mb", _peak_rss_mb())),
               **{k: runs[-1][k] for k in _ENGINE_KEYS if k in runs[-1]}})


def markdown(rows: list[BenchRow]) -> str:
    head = ("| backend | batch | total len | decode tok/s | prefill ms | e2e tok/s | e2e+tokenizer tok/s | "
            "warm-up s |\n|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r.backend} | {r.batch_size} | {r.total_length} | {r.decode_tokens_per_s} | {r.prefill_ms} | "
                   f"{r.extra['tokens_per_s_e2e']} | {r.extra['tokens_per_s_e2e_with_tokenizer']} | "
                   f"{r.extra['warmup_s']} |\n" for r in rows)
    return head + body


def plot(rows: list[BenchRow], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for backend in sorted({r.backend for r in rows}):
        for batch in sorted({r.batch_size for r in rows}):
            pts = sorted((r.total_length, r.decode_tokens_per_s) for r in rows
                         if r.backend == backend and r.batch_size == batch)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{backend} b{batch}")
    ax.set_xlabel("total length (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def _check_hf_installed() -> None:
    """Fail with the fix, not in the worker; find_spec: torch is not imported into this process."""
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise BackendUnavailableError("hf-transformers", "torch / transformers are not installed",
                                      "pip install 'wizardcoder-plugin[test]'")


def check_spec(spec: BenchSpec, model: Any, config: Any) -> None:
    """The spec's lengths, comparison engines and backends, refused before the weights load."""
    lengths = sorted(spec.lengths)
    if any(length <= spec.prompt_length for length in lengths):
        raise InputError(f"every --lengths value must exceed --prompt-length {spec.prompt_length}",
                         "e.g. --prompt-length 32 --lengths 64,128,256")
    if lengths[-1] > config.n_positions:
        raise InputError(f"length {lengths[-1]} exceeds the model's {config.n_positions} positions",
                         "lower --lengths")
    unknown = [c for c in spec.compare if c != "hf"]
    if unknown:
        raise InputError(f"unknown --compare engine(s) {unknown}", "use --compare hf")
    if "hf" in spec.compare:
        _check_hf_installed()
    for backend in spec.backends:
        if backend != "online":
            model.resolve("exporter", backend)  # an unknown one: the error lists the registered exporters


def run_bench(spec: BenchSpec, model: Any, config: Any, net: Any, tok: Any, source: Path | None,
              log: Callable[[str], None]) -> BenchResult:
    """`check_spec` first (the caller, before it builds `net`)."""
    lengths = sorted(spec.lengths)
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-"))  # exports and the HF copy of the weights
    hf: _HF | None = None
    try:
        engines = _our_engines(spec, model, net, tok, lengths[-1], work)
        if "hf" in spec.compare:
            is_hf_dir = source is not None and (Path(source) / "config.json").is_file()
            hf_dir = source if is_hf_dir else _hf_copy(net, config, work)
            hf = _HF(hf_dir)
            engines["hf-transformers"] = lambda b: hf
        rows = _measure(spec, config, engines, lengths, tok, log)
    finally:
        if hf is not None:
            hf.close()
        shutil.rmtree(work, ignore_errors=True)
    result = BenchResult(rows=rows)
    if spec.output_dir is not None:
        write_json(spec.output_dir / "bench.json", result.model_dump(mode="json"))
        write_text(spec.output_dir / "bench.md", markdown(rows))
        plot(rows, spec.output_dir / "bench.png")
    return result


def _our_engines(spec: BenchSpec, model: Any, net: Any, tok: Any, seq_length: int,
                 work: Path) -> dict[str, Callable[[int], Any]]:
    """backend -> a factory of that engine for a batch size: the online graphs, or an exporter registered for the
    model (by any plugin) exporting into `work` once per batch size, then its runner. This plugin's exporters
    export the network already loaded; another plugin's load the weights themselves."""
    from ..components import Exporter
    from .online import Generator

    engines: dict[str, Callable[[int], Any]] = {}
    for backend in spec.backends:
        if backend == "online":
            engines["online"] = lambda b: _Ours(Generator(net, NO_EOS, tok.pad_token_id, max_batch=b), tok)
            continue
        exporter = model.component("exporter", backend)

        def make(b: int, backend: str = backend, exporter: Any = exporter) -> _Ours:
            out = work / f"{backend}-b{b}"
            if not out.exists():
                export = ExportSpec(model=model.name, backend=backend, weights=spec.weights, config=spec.config,
                                    output_dir=out, batch_size=b, seq_length=seq_length)
                if isinstance(exporter, Exporter):
                    exporter.export(model, export, network=net)
                else:
                    exporter.export(model, export)
            return _Ours(exporter.runner(model, out), tok)
        engines[backend] = make
    return engines


def _measure(spec: BenchSpec, config: Any, engines: dict[str, Callable[[int], Any]], lengths: list[int],
             tok: Any, log: Callable[[str], None]) -> list[BenchRow]:
    rows: list[BenchRow] = []
    for batch in spec.batch_sizes:
        built = {name: make_engine(batch) for name, make_engine in engines.items()}
        for length in lengths:
            prompts = prompts_for(batch, spec.prompt_length, config.vocab_size)
            new = length - spec.prompt_length
            warm: dict[str, float] = {}
            for name, eng in built.items():
                t0 = time.perf_counter()
                eng.run(prompts, new)
                warm[name] = time.perf_counter() - t0
            runs: dict[str, list[dict]] = {name: [] for name in built}
            for _ in range(spec.repeats):
                for name, eng in built.items():  # interleaved: drift hits every engine alike
                    runs[name].append(eng.run(prompts, new))
            for name in built:
                row = _median_row(name, batch, length, runs[name], warm[name], tok, spec.prompt_length)
                rows.append(row)
                log(f"{name:16} b={batch:<3} len={length:<5} decode {row.decode_tokens_per_s:>8} tok/s  "
                    f"prefill {row.prefill_ms:>8} ms")
            if "hf-transformers" in runs:
                ours = [n for n in runs if n != "hf-transformers"]
                same = {n: runs[n][0]["outputs"] == runs["hf-transformers"][0]["outputs"] for n in ours}
                for r in rows[-len(built):]:
                    if r.backend in same:
                        ref = next(x for x in rows[-len(built):] if x.backend == "hf-transformers")
                        r.extra["decode_speedup_vs_hf"] = round(r.decode_tokens_per_s / max(ref.decode_tokens_per_s,
                                                                                           1e-9), 3)
                        r.extra["prefill_speedup_vs_hf"] = round(ref.prefill_ms / max(r.prefill_ms, 1e-9), 3)
                        r.extra["tokens_equal_hf"] = same[r.backend]
    return rows


def _hf_copy(net: Any, config: Any, work: Path) -> Path:
    """The model's current weights as an HF checkpoint folder, for the reference engine."""
    from ..weights import convert, save_params

    ckpt = work / "weights.safetensors"
    save_params(net.get_parameters(), ckpt)
    convert(ckpt, work / "hf", config, to="hf", progress=False)
    return work / "hf"

