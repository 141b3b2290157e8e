"""`zoo export`: the inference graphs as MindIR, ONNX or MindSpore Lite, in a self-contained folder with the
tokenizer and a `manifest.json` (architecture, graph signatures, source weights and every file's sha256).

Lite: where a recent `mindspore_lite` is importable here (Ascend servers with MindSpore 2.x) the MindIR is used
directly with the Ascend config; otherwise the ONNX graphs go through the mindspore-lite 2.0.0 converter in its
Python 3.7 environment (see `lite_runtime`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from registry_spec import __spec_version__
from registry_spec.atomic import atomic_dir
from registry_spec.errors import BackendUnavailableError, InputError
from registry_spec.specs import ExportResult, ExportSpec

from .. import __version__
from ..model.config import GPTBigCodeConfig

if TYPE_CHECKING:
    from ..model.modeling import GPTBigCodeForCausalLM
    from ..text.tokenizer import WizardCoderTokenizer

BACKENDS = ("mindir", "onnx", "lite")
GRAPHS = {"incremental": ("prefill", "decode"), "autoregressive": ("full",)}
SIGNATURES = {
    "prefill": (["input_ids", "lengths"], ["logits", "cache"]),
    "decode": (["token", "positions", "cache"], ["logits", "next_cache"]),
    "full": (["input_ids", "lengths"], ["logits"]),
}
# the reference's Lite options for Ascend (GE backend); the CPU Lite 2.0 runtime does not read them
LITE_ASCEND_CONFIG = """[ascend_context]
plugin_custom_ops=All
provider=ge

[ge_session_options]
ge.exec.formatMode=1
ge.exec.precision_mode=must_keep_origin_dtype
ge.externalWeight=1
ge.exec.atomicCleanPolicy=1
"""
ONNX_HINT = "pip install 'wizardcoder-plugin[export]'   (onnx, onnxruntime)"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(source: Path | None, seed: int) -> dict:
    if source is None:
        return {"path": None, "sha256": None, "note": f"random init, seed {seed}"}
    files = sorted(p for p in Path(source).rglob("*") if p.is_file()) if Path(source).is_dir() else [Path(source)]
    files = [p for p in files if p.suffix in {".safetensors", ".bin", ".ckpt", ".json"}]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(sha256(p).encode())
    return {"path": str(source), "sha256": h.hexdigest(), "files": [p.name for p in files]}


def lite_in_process() -> bool:
    """A mindspore_lite importable in this interpreter (newer than 2.0: reads MindSpore 2.x MindIR)."""
    return importlib.util.find_spec("mindspore_lite") is not None


def _signature(config: GPTBigCodeConfig, graph: str, batch: int, seq: int) -> dict:
    width = 2 * config.kv_heads * config.head_dim
    cache = {"shape": [config.n_layer, batch, seq, width], "dtype": "float32"}
    shapes = {"input_ids": {"shape": [batch, seq], "dtype": "int32"}, "lengths": {"shape": [batch], "dtype": "int32"},
              "token": {"shape": [batch, 1], "dtype": "int32"}, "positions": {"shape": [batch], "dtype": "int32"},
              "logits": {"shape": [batch, config.vocab_size], "dtype": "float32"}, "cache": cache,
              "next_cache": cache}
    ins, outs = SIGNATURES[graph]
    return {"inputs": [{"name": n, **shapes[n]} for n in ins], "outputs": [{"name": n, **shapes[n]} for n in outs]}


def _name_onnx_io(path: Path, graph: str) -> None:
    """MindSpore names ONNX outputs by node id; give inputs and outputs the manifest's names."""
    import onnx

    model = onnx.load(str(path))
    ins, outs = SIGNATURES[graph]
    rename = {o.name: new for o, new in zip(model.graph.output, outs, strict=True)}
    rename |= {i.name: new for i, new in zip(model.graph.input, ins, strict=True)}
    for node in model.graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
    for v in list(model.graph.input) + list(model.graph.output):
        v.name = rename.get(v.name, v.name)
    onnx.save(model, str(path))


def earlier_export(folder: Path) -> bool:
    """Whether `folder` holds an earlier export and nothing else: its manifest names every file in it."""
    try:
        named = {*json.loads((folder / "manifest.json").read_text())["files"], "manifest.json"}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return {p.name for p in folder.iterdir()} <= named


def check_length(spec: ExportSpec, config: GPTBigCodeConfig) -> None:
    seq = spec.seq_length or config.seq_length
    if seq > config.n_positions:
        raise InputError(f"--seq-length {seq} exceeds the model's {config.n_positions} positions",
                         f"use at most {config.n_positions}")


def run_export(spec: ExportSpec, model: GPTBigCodeForCausalLM, config: GPTBigCodeConfig,
               tokenizer: WizardCoderTokenizer, source: Path | None, seed: int = 0) -> ExportResult:
    import mindspore as ms
    from tqdm import tqdm

    from .graphs import DecodeGraph, FullGraph, PrefillGraph, example_inputs

    if spec.backend not in BACKENDS:
        raise InputError(f"unknown export backend {spec.backend!r}", f"use one of {', '.join(BACKENDS)}")
    if spec.backend in ("onnx", "lite") and importlib.util.find_spec("onnx") is None \
            and not (spec.backend == "lite" and lite_in_process()):
        raise BackendUnavailableError(spec.backend, "the onnx package is not installed", ONNX_HINT)
    worker = None
    if spec.backend == "lite" and not lite_in_process():
        from .lite_runtime import LiteWorker

        worker = LiteWorker()  # fails early, before any graph is built, when the runtime is missing
    seq = spec.seq_length or config.seq_length  # checked by the caller (check_length), before the weights loaded
    try:
        cells = {"prefill": PrefillGraph, "decode": DecodeGraph, "full": FullGraph}
        graphs = {}
        with atomic_dir(spec.output_dir, earlier_export) as tmp:
            # at 15B each graph takes minutes to trace and serialize: a bar on a terminal (none when piped)
            for graph in tqdm(GRAPHS[spec.mode], desc=f"export {spec.backend}", unit="graph", leave=False,
                              disable=None):
                cell = cells[graph](model)
                inputs = example_inputs(config, graph, spec.batch_size, seq)
                fmt = "MINDIR" if spec.backend == "mindir" or (spec.backend == "lite" and worker is None) else "ONNX"
                ms.export(cell, *inputs, file_name=str(tmp / graph), file_format=fmt)
                file = f"{graph}.{fmt.lower()}"
                if fmt == "ONNX":
                    _name_onnx_io(tmp / file, graph)
                if worker is not None:
                    from .lite_runtime import prepare_onnx_for_lite

                    prepare_onnx_for_lite(tmp / file, tmp / f"{graph}.lite.onnx")
                    converted = worker.convert(tmp / f"{graph}.lite.onnx", tmp / f"{graph}.lite")
                    for leftover in (tmp / file, tmp / f"{graph}.lite.onnx"):
                        leftover.unlink()
                    file = converted.name
                graphs[graph] = {"file": file, **_signature(config, graph, spec.batch_size, seq)}
            if spec.backend == "lite":
                (tmp / "lite_ascend.ini").write_text(LITE_ASCEND_CONFIG)
            tokenizer.backend.save(str(tmp / "tokenizer.json"))
            files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {
                "format": "zoo-export/1", "spec_version": __spec_version__,
                "exporter": f"wizardcoder-plugin {__version__}",
                "model": spec.model, "backend": spec.backend, "mode": spec.mode, "precision": spec.precision,
                "batch_size": spec.batch_size, "seq_length": seq,
                "runtime": ("mindspore-lite 2.0.0 (python3.7 worker)" if worker is not None else
                            "mindspore_lite (in process)" if spec.backend == "lite" else spec.backend),
                "architecture": config.model_dump(), "graphs": graphs,
                "tokenizer": {"file": "tokenizer.json", "eos_token_id": tokenizer.eos_token_id,
                              "pad_token_id": tokenizer.pad_token_id},
                "source_weights": weights_digest(source, seed), "files": files,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for p in tmp.iterdir():
                os.chmod(p, 0o644)  # ms.export writes 0400 files; keep the folder easy to copy and replace
    finally:
        if worker is not None:
            worker.close()
    return ExportResult(output_dir=spec.output_dir, backend=spec.backend, mode=spec.mode,
                        manifest=spec.output_dir / "manifest.json", files=sorted([*files, "manifest.json"]))
