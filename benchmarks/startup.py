"""Start-up and load cost at real sizes: a cold and a warm `zoo predict` (16 new tokens) against HF transformers'
`from_pretrained` + `generate` of the same random checkpoint, each run a fresh process timed from its start to
its exit with its peak RSS (wait4); then `zoo convert`'s peak RSS. Shapes: the 1B WizardCoder (sharded safetensors,
fp32, 4.5 GB) and tiny_starcoder (164M). "Cold" is a first run after installing: the native kernels built as
scripts/setup.sh builds them (`python -m wizardcoder_plugin.kernels build`, timed on its own), the timing
choices and the compile cache empty; "unbuilt" is a first run that also finds no kernel build (it compiles them
while MindSpore starts); "warm" runs again with the caches the cold run left. The 3B and 15B figures are
extrapolated from the two measured shapes' per-parameter costs.

    python benchmarks/startup.py                       # both shapes (writes ~5 GB under --work)
    python benchmarks/startup.py --shapes tiny_starcoder --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, machine  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
TOKENIZER = ROOT / "src" / "wizardcoder_plugin" / "data" / "tokenizer"
SHAPES = {
    "1b": {"n_embd": 2048, "n_layer": 24, "n_head": 16},
    "tiny_starcoder": {"n_embd": 768, "n_layer": 20, "n_head": 12, "n_inner": 3072},
}
BASE = {"model_type": "gpt_bigcode", "vocab_size": 49153, "n_positions": 8192, "multi_query": True,
        "activation_function": "gelu_pytorch_tanh", "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 49152}
PROMPT = "def fibonacci(n):"
NEW_TOKENS = 16

MAKE = """
import json, sys, torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM
torch.manual_seed(0)
cfg = GPTBigCodeConfig(**json.loads(sys.argv[2]))
GPTBigCodeForCausalLM(cfg).save_pretrained(sys.argv[1], max_shard_size="2GB", safe_serialization=True)
"""
HF_PREDICT = """
import sys, time, torch
from transformers import AutoTokenizer, GPTBigCodeForCausalLM
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = GPTBigCodeForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
ids = tok(sys.argv[2], return_tensors="pt").input_ids
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False, pad_token_id=49152)
print(out.shape[1] - ids.shape[1])
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS GiB, stdout) of one fresh process, reaped with wait4 for its own rusage."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 2**20, out.read()


def make_checkpoint(folder: Path, shape: str) -> tuple[Path, dict]:
    cfg = BASE | SHAPES[shape]
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"creating a random {shape} checkpoint in {folder} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", MAKE, str(tmp), json.dumps(cfg)], check=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER / f, tmp / f)
        tmp.rename(folder)
    return folder, cfg


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def zoo(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("zoo")), *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny_starcoder,1b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zoo-startup"))
    ap.add_argument("--repeats", type=int, default=2, help="HF and warm zoo runs: the best of N")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        folder, cfg = make_checkpoint(args.work / shape, shape)
        cache, unbuilt = args.work / f"cache-{shape}", args.work / f"cache-{shape}-unbuilt"
        for c in (cache, unbuilt):
            shutil.rmtree(c, ignore_errors=True)
        env = os.environ | {"ZOO_KERNEL_CACHE": str(cache / "kernels"), "ZOO_COMPILE_CACHE": str(cache / "compile")}
        bare = os.environ | {"ZOO_KERNEL_CACHE": str(unbuilt / "kernels"),
                             "ZOO_COMPILE_CACHE": str(unbuilt / "compile")}
        predict = zoo("predict", "wizardcoder-1b", "--config", str(folder / "config.json"), "--weights", str(folder),
                      "--prompt", PROMPT, "--template", "none", "--max-new-tokens", str(NEW_TOKENS),
                      "--batch-size", "1", "--json")
        hf_cmd = [sys.executable, "-c", HF_PREDICT, str(folder), PROMPT, str(NEW_TOKENS)]
        ms_out = args.work / f"{shape}.ms.safetensors"
        convert = zoo("convert", "wizardcoder-1b", "--config", str(folder / "config.json"), "--input", str(folder),
                      "--output", str(ms_out), "--to", "ms", "--json")
        conv_wall, conv_rss, _ = timed(convert, env)
        ms_out.unlink(missing_ok=True)
        hf = [timed(hf_cmd) for _ in range(args.repeats)]
        unbuilt_run = timed(predict, bare)
        build_wall = timed([sys.executable, "-m", "wizardcoder_plugin.kernels", "build"], env)[0]
        cold = timed(predict, env)
        warm = [timed(predict, env) for _ in range(args.repeats)]
        tokens = len(json.loads(cold[2].splitlines()[0])["token_ids"])
        gb = weight_bytes(folder) / 2**30
        n_params = weight_bytes(folder) / 4
        row = {"shape": shape, "parameters": n_params, "weights_gb": gb, "hf_wall": min(w for w, _, _ in hf),
               "hf_rss": min(r for _, r, _ in hf), "cold_wall": cold[0], "cold_rss": cold[1],
               "unbuilt_wall": unbuilt_run[0], "kernel_build_wall": build_wall,
               "warm_wall": min(w for w, _, _ in warm), "warm_rss": min(r for _, r, _ in warm),
               "convert_wall": conv_wall, "convert_rss": conv_rss, "tokens": tokens}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    table = render(rows)
    if args.no_append:
        print(table)
    else:
        append_results("Start-up at real sizes", "python benchmarks/startup.py " + " ".join(sys.argv[1:]), machine(),
                       table, [])


def render(rows: list[dict]) -> str:
    lines = ["| shape | weights | HF wall / RSS | zoo cold wall / RSS | zoo warm wall / RSS | cold/HF | warm/HF | "
             "unbuilt wall (/HF) | kernel build | RSS / weights | convert wall / RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} ({r['parameters'] / 1e9:.2f}B) | {r['weights_gb']:.2f} GiB | {r['hf_wall']:.1f} s / "
            f"{r['hf_rss']:.2f} GiB | {r['cold_wall']:.1f} s / {r['cold_rss']:.2f} GiB | {r['warm_wall']:.1f} s / "
            f"{r['warm_rss']:.2f} GiB | {r['cold_wall'] / r['hf_wall']:.2f}× | {r['warm_wall'] / r['hf_wall']:.2f}× | "
            f"{r['unbuilt_wall']:.1f} s ({r['unbuilt_wall'] / r['hf_wall']:.2f}×) | {r['kernel_build_wall']:.1f} s | "
            f"{r['warm_rss'] / r['weights_gb']:.2f}× | {r['convert_wall']:.1f} s / {r['convert_rss']:.2f} GiB |")
    if len(rows) >= 2:
        lines.append("")
        lines.append(extrapolate(rows))
    return "\n".join(lines)


def extrapolate(rows: list[dict]) -> str:
    """A line through the two measured shapes (cost = fixed + per parameter), read at 3B and 15B."""
    (a, b) = sorted(rows, key=lambda r: r["parameters"])[:2]
    targets = {"3B": 3.0e9, "15B": 15.5e9}
    out = []
    for key, label in (("warm_wall", "zoo warm wall"), ("hf_wall", "HF wall"), ("warm_rss", "zoo RSS GiB"),
                       ("hf_rss", "HF RSS GiB")):
        slope = (b[key] - a[key]) / (b["parameters"] - a["parameters"])
        fixed = a[key] - slope * a["parameters"]
        out.append(f"{label}: " + ", ".join(f"{k} ≈{fixed + slope * n:.1f}" for k, n in targets.items()))
    return "Extrapolated (fp32, same machine): " + "; ".join(out) + "."


if __name__ == "__main__":
    main()
