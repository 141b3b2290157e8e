"""Running an exported folder: verify its manifest and every file's sha256, load the graphs in their runtime
(MindSpore for MindIR, onnxruntime for ONNX, MindSpore Lite in-process or through the Python 3.7 worker), and
generate with the same decoding loop as the online model (`generate.decode_loop`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from registry_spec.errors import BackendUnavailableError, InputError

from .config import GPTBigCodeConfig
from .export import ONNX_HINT, lite_in_process, sha256
from .generate import GenerationConfig, GenerationOutput, Generator, decode_loop


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

        from .runtime import init_mindspore

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


class ExportedGenerator(Generator):
    """Generator over exported fixed-shape graphs: batches of exactly `batch_size`, sequences of `seq_length`."""

    def __init__(self, folder: Path, backend: str, eos_token_id: int, pad_token_id: int) -> None:
        self.manifest = read_manifest(folder, backend)
        self.config = GPTBigCodeConfig.model_validate(self.manifest["architecture"]).model_copy(
            update={"seq_length": self.manifest["seq_length"]})
        self.runtime = _Runtime(folder, self.manifest)
        self.batch = self.manifest["batch_size"]
        self.max_batch = self.batch
        self.eos, self.pad = eos_token_id, pad_token_id

    def decode_kernels(self, batch: int) -> dict[str, object]:
        return {}  # the backend's runtime decides

    def _generate_chunk(self, prompts: list[list[int]], cfg: GenerationConfig, rng: np.random.Generator,
                        on_token: Callable | None, should_stop: Callable | None) -> list[GenerationOutput]:
        if len(prompts) > self.batch:  # run_predict may lower max_batch; never raise it past the graph's batch
            out: list[GenerationOutput] = []
            for s in range(0, len(prompts), self.batch):
                out += self._generate_chunk(prompts[s:s + self.batch], cfg, rng, on_token, should_stop)
            return out
        b, t = self.batch, self.config.seq_length
        n = len(prompts)
        lengths = np.array([len(p) for p in prompts] + [1] * (b - n), dtype=np.int32)
        ids = np.full((b, t), self.pad, dtype=np.int32)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        g = self.runtime.graphs
        t0 = time.perf_counter()
        if "prefill" in g:
            logits, cache = g["prefill"](ids, lengths)
            state = {"cache": cache}

            def step(tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
                logits, state["cache"] = g["decode"](tokens.reshape(b, 1), positions.astype(np.int32),
                                                     state["cache"])
                return logits
        else:
            (logits,) = g["full"](ids, lengths)

            def step(tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
                ids[np.arange(b), positions] = tokens
                return g["full"](ids, (positions + 1).astype(np.int32))[0]
        prefill_ms = (time.perf_counter() - t0) * 1e3
        return decode_loop(prompts, lengths, b, t, logits, step, prefill_ms, cfg, rng, self.eos, self.pad,
                           on_token, should_stop)
