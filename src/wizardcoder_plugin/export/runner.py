"""Running an exported folder: verify its manifest and every file's sha256, load the graphs in their runtime
(MindSpore for MindIR, onnxruntime for ONNX, MindSpore Lite in-process or through the Python 3.7 worker), and
and serve them as an `Engine` to the host's one generation loop."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from registry_spec.errors import BackendUnavailableError, InputError

from ..model.config import GPTBigCodeConfig
from .writer import ONNX_HINT, lite_in_process, sha256


def read_manifest(folder: Path, backend: str) -> dict:
    """The manifest, after checking that it matches the backend and that no file was changed or removed."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{folder} has no manifest.json", "pass the --output-dir of `zoo export` as --artifacts")
    manifest = json.loads(path.read_text())
    if manifest.get("backend") != backend:
        raise InputError(f"{folder} holds a {manifest.get('backend')!r} export, not {backend!r}",
                         f"pass --backend {manifest.get('backend')}")
    for name, digest in manifest["files"].items():
        p = Path(folder) / name
        if not p.is_file():
            raise InputError(f"exported file {p} is missing", "re-export the model")
        if sha256(p) != digest:
            raise InputError(f"exported file {p} does not match its sha256 in manifest.json (modified or corrupt)",
                             "re-export the model; never edit exported files")
    return manifest


class _Runtime:
    """name -> callable(*arrays) -> list of arrays, for each graph of the manifest."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.graphs: dict[str, Callable[..., list[np.ndarray]]] = {}
        backend = manifest["backend"]
        for name, g in manifest["graphs"].items():
            path = Path(folder) / g["file"]
            self.graphs[name] = getattr(self, f"_load_{backend}")(name, path)

    def _load_mindir(self, name: str, path: Path) -> Callable:
        from mindspore import Tensor, nn

        from ..model.runtime import init_mindspore

        ms = init_mindspore()
        cell = nn.GraphCell(ms.load(str(path)))

        def run(*arrays: np.ndarray) -> list[np.ndarray]:
            out = cell(*(Tensor(a) for a in arrays))
            return [o.asnumpy() for o in (out if isinstance(out, tuple) else (out,))]
        return run

    def _load_onnx(self, name: str, path: Path) -> Callable:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("onnx", "onnxruntime is not installed", ONNX_HINT) from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        return lambda *arrays: sess.run(None, dict(zip(names, arrays, strict=True)))

    def _load_lite(self, name: str, path: Path) -> Callable:
        if path.suffix == ".mindir" and lite_in_process() and not path.name.endswith(".lite.mindir"):
            import mindspore_lite as mslite

            ctx = mslite.Context()
            ctx.target = ["ascend"] if _has_ascend() else ["cpu"]
            model = mslite.Model()
            config = path.with_name("lite_ascend.ini")
            model.build_from_file(str(path), mslite.ModelType.MINDIR, ctx,
                                  str(config) if ctx.target == ["ascend"] else "")

            def run(*arrays: np.ndarray) -> list[np.ndarray]:
                inputs = model.get_inputs()
                for t, a in zip(inputs, arrays, strict=True):
                    t.set_data_from_numpy(a)
                return [np.array(o.get_data_to_numpy(), copy=True) for o in model.predict(inputs)]
            return run
        if not hasattr(self, "_worker"):
            from .lite_runtime import LiteWorker

            self._worker = LiteWorker()
        self._worker.load(name, path)
        return lambda *arrays: self._worker.run(name, *arrays)


def _has_ascend() -> bool:
    return Path("/usr/local/Ascend").is_dir()


class ExportedEngine:
    """The host's `Engine` over exported fixed-shape graphs: batches of exactly `batch_size` rows, sequences of
    `seq_length` tokens, the cache passed in and out of the decode graph."""

    def __init__(self, folder: Path, backend: str) -> None:
        self.manifest = read_manifest(folder, backend)
        self.config = GPTBigCodeConfig.model_validate(self.manifest["architecture"]).model_copy(
            update={"seq_length": self.manifest["seq_length"]})
        self.runtime = _Runtime(folder, self.manifest)
        self.fixed_batch = self.max_batch = self.manifest["batch_size"]
        self.fixed_length = self.context_length = self.config.seq_length

    def decode_kernels(self, batch: int) -> dict[str, object]:
        return {}  # the backend's runtime decides

    def prefill(self, ids: np.ndarray, lengths: np.ndarray, max_len: int, greedy: bool,
                use_cache: bool) -> tuple[np.ndarray, Any]:
        g = self.runtime.graphs
        if "prefill" in g:
            logits, cache = g["prefill"](ids, lengths)
            return logits, {"cache": cache}
        (logits,) = g["full"](ids, lengths)
        return logits, {"ids": ids.copy()}

    def join(self, cache: Any, slots: np.ndarray, ids: np.ndarray, lengths: np.ndarray, greedy: bool) -> np.ndarray:
        """Rows into `slots` of a running batch: the fixed-batch prefill with them in those rows (the others repeat
        the first row: any valid tokens), their rows of its cache copied into the running one."""
        full = np.repeat(ids[:1], self.fixed_batch, axis=0)
        full_lengths = np.ones(self.fixed_batch, dtype=np.int32)
        full[slots], full_lengths[slots] = ids, lengths
        logits, fresh = self.prefill(full, full_lengths, self.context_length, greedy, "cache" in cache)
        if "cache" in cache:
            cache["cache"][:, slots] = fresh["cache"][:, slots]
        else:
            cache["ids"][slots] = fresh["ids"][slots]
        return logits[slots]

    def step(self, cache: Any, tokens: np.ndarray, positions: np.ndarray, greedy: bool | None = None) -> np.ndarray:
        g = self.runtime.graphs
        positions = positions.astype(np.int32)
        if "cache" in cache:
            logits, cache["cache"] = g["decode"](tokens.reshape(-1, 1).astype(np.int32), positions, cache["cache"])
            return logits
        ids = cache["ids"]
        ids[np.arange(ids.shape[0]), positions] = tokens
        return g["full"](ids, positions + 1)[0]
