"""Native CPU kernels, the one seam where hand-written code replaces MindSpore's: C++ in `native/`, a file per job
(`common.h`: SIMD vocabulary, the thread pool's interface, shared math; `pool.cc`: the fork-join pool;
`linear.cc`: multi-threaded small-row linear layers, a GPTBigCode block's decode step in one call, the prefill's
epilogues; `head.cc`: the screened greedy LM head; `gemm.cc`: the packed GEMM of linear layers' backward;
`training.cc`: LayerNorm, GELU and cross-entropy forward and backward, the AdamW update), compiled in parallel
with the machine's C++ compiler (at install by `python -m wizardcoder_plugin.kernels build`, else on first use),
linked into one library, and run inside MindSpore graphs as Custom "aot" ops. `cells` substitutes them into the
inference cells; `choices` holds every timing-based choice between these kernels and MindSpore's.

The library is built once per (sources, compiler, flags, CPU) and cached under `$ZOO_KERNEL_CACHE` (default
`~/.cache/zoo/kernels`), written atomically; `$ZOO_KERNEL_MARCH` picks the target (default `native`). Without a
compiler, off x86-64/aarch64 Linux, or with `ZOO_NATIVE_KERNELS=0`, `native_kernels()` says why and decoding
keeps MindSpore's own kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from registry_spec.errors import InputError

SOURCE_DIR = Path(__file__).with_name("native")
SOURCES = tuple(sorted(SOURCE_DIR.glob("*.cc")))
COMPILE_FLAGS = ("-O3", "-fPIC", "-std=c++17", "-pthread")
LINK_FLAGS = ("-shared", "-pthread")
Op = Callable[..., Any]  # a MindSpore Custom primitive: called inside graphs on Tensors


def flags() -> tuple[str, ...]:
    """The compile flags: COMPILE_FLAGS and `-march=$ZOO_KERNEL_MARCH` (default `native`; e.g. `haswell` for the
    AVX2 path, `x86-64` for the portable C one)."""
    return (*COMPILE_FLAGS, f"-march={os.environ.get('ZOO_KERNEL_MARCH') or 'native'}", f"-I{SOURCE_DIR}")


class KernelUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here; the message says why."""


@dataclass(frozen=True)
class NativeKernels:
    """The compiled library and the Custom primitives built on it (fp32; each entry point's argument list is above
    it in `native/`)."""

    library: Path
    threads: int  # the pool's threads, the caller's included (ZOO_KERNEL_THREADS, else the CPUs it may use)
    linear: Op  # (x [M,K], W [N,K]) -> [M,N]
    # (hidden [B,E], ln_1, c_attn, key/value caches (written in place), positions, c_proj, ln_2, c_fc, c_proj,
    # meta [eps, exact_gelu]) -> hidden
    decode_layer: Op
    layer_norm: Op  # (x [..., E], weight, bias, meta [eps]) -> y, differentiable (native backward)
    gelu: Op  # (x, meta [exact]) -> y, differentiable (native backward)
    linear_backward: Op  # (x [M,K], W [N,K], dy [M,N]) -> (dx = dy W, dW = dy^T x, db = sum of dy's rows)
    # (logits [R,V], labels [R] int32, -100 ignored) -> (nll [R], log-sum-exp [R]); differentiable in nll
    cross_entropy: Op
    bias_add: Op  # (y [R,N], b [N], optional residual [R,N]) -> y + b (+ residual)
    bias_gelu: Op  # (y [R,N], b [N], meta [exact]) -> GELU(y + b)
    sum_squares: Op  # (g, total [1]) -> total + sum(g^2) [1]
    adamw_step: Op  # (p, m, v, g, hyper [7], decay [1]) -> done [1]; p, m, v updated and g zeroed in place
    greedy_head: Op  # (hidden [B,E], ln_f, W [V,E], Q int8 [V,E], info [V,3], meta [eps]) -> ids [B] int64
    host: ctypes.CDLL  # the library through ctypes: entry points called on numpy arrays (GreedyTables)


def cache_dir() -> Path:
    return Path(os.environ.get("ZOO_KERNEL_CACHE", Path.home() / ".cache" / "zoo" / "kernels"))


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise KernelUnavailable("no C++ compiler found (set CXX, or install g++)")


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (part of the cache key either way)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(lines)))


def _compile(cxx: str, source: Path, obj: Path) -> None:
    try:
        done = subprocess.run([cxx, *flags(), "-c", str(source), "-o", str(obj)], capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise KernelUnavailable(f"compiling {source.name} with {cxx} timed out") from exc
    if done.returncode != 0:
        raise KernelUnavailable(f"compiling {source.name} with {cxx} failed:\n{done.stderr.strip()[-2000:]}")


def build(sources: Sequence[Path] = SOURCES) -> Path:
    """Compile `sources` (in parallel, one object each) and link them into the cache, once per sources, headers,
    compiler, flags and CPU; the library's path."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        raise KernelUnavailable(f"native kernels are built for Linux x86-64/aarch64, not {platform.system()} "
                                f"{platform.machine()}")
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelUnavailable(f"{cxx} --version failed: {exc}") from exc
    texts = [p.read_text() for p in (*sources, *sorted(SOURCE_DIR.glob("*.h")))]
    key = hashlib.sha256("\0".join([*texts, cxx, version, *flags(), *LINK_FLAGS, _cpu_signature()]).encode())
    target = cache_dir() / f"native-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    except OSError as exc:
        raise KernelUnavailable(f"cannot write the kernel cache {target.parent}: {exc} (set ZOO_KERNEL_CACHE to a "
                                "writable folder)") from exc
    try:
        objects = [work / f"{i}-{s.stem}.o" for i, s in enumerate(sources)]
        with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as compilers:
            for job in [compilers.submit(_compile, cxx, s, o) for s, o in zip(sources, objects, strict=True)]:
                job.result()  # the first failure, with the compiler's message
        linked = work / "library.so"
        done = subprocess.run([cxx, *LINK_FLAGS, *map(str, objects), "-o", str(linked)], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise KernelUnavailable(f"linking the kernels with {cxx} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(linked, target)  # atomic: a concurrent builder's identical file may win, either is complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


_prebuild: list[threading.Thread] = []


def prebuild() -> None:
    """Start building the library in the background, so the compiler runs while MindSpore starts and the weights
    load (on a cold cache the build is the largest part of a first run's start-up)."""
    if _prebuild or os.environ.get("ZOO_NATIVE_KERNELS", "1") == "0":
        return

    def run() -> None:
        try:
            build()
        except KernelUnavailable:
            pass  # reported, once, when the kernels are asked for

    _prebuild.append(threading.Thread(target=run, name="zoo-kernel-build", daemon=True))
    _prebuild[0].start()


def native_kernels() -> NativeKernels:
    """Build (or find) the library and wrap its entry points as Custom ops; raises KernelUnavailable with the
    reason where that is not possible. Tried once per process: a failure is remembered, not retried."""
    loaded = _load()
    if isinstance(loaded, KernelUnavailable):
        raise loaded
    return loaded


@lru_cache(maxsize=1)
def _load() -> NativeKernels | KernelUnavailable:
    try:
        return _build_and_wrap()
    except KernelUnavailable as exc:
        if os.environ.get("ZOO_NATIVE_KERNELS", "1") != "0":  # said once per process: the reason things are slower
            print(f"note: native CPU kernels unavailable, using MindSpore's: {str(exc).splitlines()[0]}",
                  file=sys.stderr)
        return exc


def _build_and_wrap() -> NativeKernels:
    if os.environ.get("ZOO_NATIVE_KERNELS", "1") == "0":
        raise KernelUnavailable("disabled by ZOO_NATIVE_KERNELS=0")
    threads = os.environ.get("ZOO_KERNEL_THREADS")
    if threads is not None and not (threads.strip().isdigit() and int(threads) > 0):  # the pool would ignore it
        raise InputError(f"ZOO_KERNEL_THREADS={threads!r} is not a positive whole number",
                         "set it to the kernels' thread count (e.g. 2), or unset it for the CPUs this process may use")
    for started in _prebuild:
        started.join()
    library = build()
    try:
        lib = ctypes.CDLL(str(library))  # a broken library fails here, with the loader's message, not in a graph
    except OSError as exc:
        raise KernelUnavailable(f"loading {library} failed: {exc}") from exc
    lib.GreedyTables.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.GreedyTables.restype = ctypes.c_int  # (W [V,E] fp32, V, E, out Q [V,E] int8, out info [V,3]) -> 1: non-finite
    import mindspore as ms
    from mindspore import ops

    def custom(entry: str, out_shape: object, outputs: int = 1, dtype: object = None, bprop: object = None) -> object:
        """An entry point as a Custom op (differentiable through `bprop`); its outputs take the first input's
        dtype unless `dtype` is given."""
        if dtype is None:
            dtype = (lambda x, *_: x) if outputs == 1 else (lambda x, *_: [x] * outputs)
        return ops.Custom(f"{library}:{entry}", out_shape=out_shape, out_dtype=dtype, func_type="aot", bprop=bprop)

    layer_norm_backward = custom("LayerNormBackward", lambda x, g, *_: [list(x), list(g), list(g)], outputs=3)

    def layer_norm_bprop(x: object, g: object, b: object, meta: object, out: object, dout: object) -> tuple:
        dx, dg, db = layer_norm_backward(x, g, dout, meta)
        return dx, dg, db, ops.zeros_like(meta)

    gelu_backward = custom("GeluBackward", lambda x, *_: list(x))

    def gelu_bprop(x: object, meta: object, out: object, dout: object) -> tuple:
        return gelu_backward(x, dout, meta), ops.zeros_like(meta)

    cross_entropy_backward = custom("CrossEntropyBackward", lambda x, *_: list(x))

    def cross_entropy_bprop(logits: object, labels: object, out: object, dout: object) -> tuple:
        return cross_entropy_backward(logits, labels, out[1], dout[0]), ops.zeros_like(labels)

    return NativeKernels(library, lib.KernelThreads(), custom("Linear", lambda x, w: [x[0], w[0]]),
                         custom("DecodeLayer", lambda hidden, *_: list(hidden)),
                         custom("LayerNormForward", lambda x, *_: x, bprop=layer_norm_bprop),
                         custom("GeluForward", lambda x, *_: x, bprop=gelu_bprop),
                         custom("LinearBackward", lambda x, w, dy: [list(x), list(w), [w[0]]], outputs=3),
                         custom("CrossEntropyForward", lambda x, *_: [[x[0]], [x[0]]], outputs=2,
                                bprop=cross_entropy_bprop),
                         custom("BiasAdd", lambda y, *_: list(y)), custom("BiasGelu", lambda y, *_: list(y)),
                         custom("SumSquares", lambda *_: [1]), custom("AdamWStep", lambda *_: [1]),
                         custom("GreedyHead", lambda hidden, *_: [hidden[0]], dtype=ms.int64), lib)


def availability() -> tuple[bool, str]:
    """(usable, why not) without raising."""
    try:
        native_kernels()
    except KernelUnavailable as exc:
        return False, str(exc)
    return True, ""
