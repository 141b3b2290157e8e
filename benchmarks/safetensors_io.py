"""Reading and writing a real-size safetensors checkpoint: the `safetensors` library's readers and writer against this
plugin's (`weights/safetensors_files.py`: the library's header parser, then views of the file's pages; a streaming
writer), and MindSpore's own loader; each case a fresh process timed from start
to exit with its peak RSS and its peak private (anonymous) memory. Reading hands every tensor over as an array and
reads each once (a sum), as a load followed by a first forward does; writing writes the same tensors as shards of at
most 2 GB. The checkpoint is `startup.py`'s random 1B one (sharded fp32, 4.5 GB), created if missing; `--dtype bf16`
reads a bf16 copy of it (made once with `zoo convert --dtype bf16`) as bf16 and as fp32 arrays, the library through
torch as HF's loader does.

    python benchmarks/safetensors_io.py [--work /tmp/zoo-startup] [--repeats 2] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, machine  # noqa: E402
from startup import make_checkpoint, timed, zoo  # noqa: E402

SUM = "total = sum(float(np.add.reduce(a, axis=None, dtype=np.float32)) for a in held.values())\n"
CASES = {
    "read, safetensors library": """
import sys, numpy as np
from pathlib import Path
from safetensors import safe_open
held = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(f), framework="numpy") as s:
        for k in s.keys():
            held[k] = s.get_tensor(k)
""" + SUM,
    "read, zoo (mapped)": """
import sys, numpy as np
from pathlib import Path
from wizardcoder_plugin.weights.safetensors_files import lazy_tensors
held = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    for k, t in lazy_tensors(f):
        held[k] = t.mapped() if t.mapped is not None else t.read()
""" + SUM,
    # MindSpore's public loader: its own pure-Python reader (mmap copy-on-write + np.frombuffer, not the library)
    "read, MindSpore's own (`mindspore.load_checkpoint(format=\"safetensors\")`)": """
import sys, numpy as np
from pathlib import Path
import mindspore as ms
held = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    held.update({k: p.asnumpy() for k, p in ms.load_checkpoint(str(f), format="safetensors").items()})
""" + SUM,
    "write, safetensors library": """
import sys
from pathlib import Path
from safetensors.numpy import save_file
from wizardcoder_plugin.weights.safetensors_files import lazy_tensors, plan_shards
items = [it for f in sorted(Path(sys.argv[1]).glob("*.safetensors")) for it in lazy_tensors(f)]
for i, shard in enumerate(plan_shards(items, 2 * 2**30)):
    save_file({k: t.read() for k, t in shard}, str(Path(sys.argv[2]) / f"shard-{i}.safetensors"))
""",
    # safetensors 0.8 writes from each array's own memory (no bytes copy): handed the source file's mapped pages,
    # it holds no private copy (a shard's pages are mapped at once: they count in its RSS until it is written)
    "write, safetensors library (mapped views)": """
import sys
from pathlib import Path
from safetensors.numpy import save_file
from wizardcoder_plugin.weights.safetensors_files import lazy_tensors, plan_shards
items = [it for f in sorted(Path(sys.argv[1]).glob("*.safetensors")) for it in lazy_tensors(f)]
for i, shard in enumerate(plan_shards(items, 2 * 2**30)):
    save_file({k: t.mapped() if t.mapped is not None else t.read() for k, t in shard},
              str(Path(sys.argv[2]) / f"shard-{i}.safetensors"))
""",
    "write, zoo (streaming)": """
import sys
from pathlib import Path
from wizardcoder_plugin.weights.safetensors_files import lazy_tensors, write_sharded
items = [it for f in sorted(Path(sys.argv[1]).glob("*.safetensors")) for it in lazy_tensors(f)]
write_sharded(Path(sys.argv[2]), items, 2 * 2**30)
""",
    # what rank 0 of a data-parallel run writes its checkpoints with (the other ranks wait on it)
    "write, zoo (streaming, flushed every 256 MiB)": """
import sys
from pathlib import Path
from wizardcoder_plugin.weights.safetensors_files import lazy_tensors, plan_shards, write_file
items = [it for f in sorted(Path(sys.argv[1]).glob("*.safetensors")) for it in lazy_tensors(f)]
for i, shard in enumerate(plan_shards(items, 2 * 2**30)):
    write_file(Path(sys.argv[2]) / f"shard-{i}.safetensors", shard, sync_every=256 * 2**20)
""",
}
BF16_CASES = {
    # the library's numpy reader names bf16 by numpy's type name, which importing ml_dtypes registers
    "read bf16, safetensors library": CASES["read, safetensors library"].replace("import sys,",
                                                                                 "import ml_dtypes, sys,"),
    "read bf16, zoo (mapped)": CASES["read, zoo (mapped)"],
    "read bf16 as fp32, safetensors library + torch": """
import sys, numpy as np
from pathlib import Path
from safetensors import safe_open
held = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(f), framework="pt") as s:
        for k in s.keys():
            held[k] = s.get_tensor(k).float().numpy()
""" + SUM,
    "read bf16 as fp32, zoo": """
import sys, numpy as np
from pathlib import Path
from wizardcoder_plugin.weights.safetensors_files import lazy_tensors
held = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    for k, t in lazy_tensors(f):
        held[k] = t.cast("F32").read()
""" + SUM,
}
ANON_AT_EXIT = "\nimport re\nprint(re.search(r'RssAnon:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"


def bf16_copy(folder: Path) -> Path:
    """The checkpoint in bf16, written once by `zoo convert` beside it."""
    target = folder.with_name(folder.name + "-bf16")
    if not (target / "config.json").is_file():
        print(f"converting {folder} to bf16 in {target} ...", file=sys.stderr)
        subprocess.run(zoo("convert", "wizardcoder-1b", "--config", str(folder / "config.json"), "--input",
                           str(folder), "--output", str(target), "--to", "hf", "--dtype", "bf16"), check=True)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/zoo-startup"))
    ap.add_argument("--repeats", type=int, default=2, help="the best of N per case, the cases interleaved")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder, _ = make_checkpoint(args.work / "1b", "1b")
    cases = CASES
    if args.dtype == "bf16":
        folder, cases = bf16_copy(folder), BF16_CASES
    gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
    out = args.work / "safetensors-io-out"
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(args.repeats):
        for name, code in cases.items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            wall, rss, stdout = timed([sys.executable, "-c", code + ANON_AT_EXIT, str(folder), str(out)])
            anon = int(stdout.split()[-1]) / 2**20  # RssAnon at exit, GiB: the private copies still held
            if name not in best or wall < best[name][0]:
                best[name] = (wall, rss, anon)
            print(json.dumps({"case": name, "wall_s": wall, "peak_rss_gib": rss, "anon_gib": anon}), file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    lines = [f"1B checkpoint, {gb:.2f} GiB {args.dtype} in shards; best of {args.repeats}.", "",
             "| case | wall | peak RSS | private memory at exit |", "|---|---|---|---|"]
    lines += [f"| {name} | {w:.1f} s | {r:.2f} GiB ({r / gb:.2f}× the weights) | {a:.2f} GiB |"
              for name, (w, r, a) in best.items()]
    table = "\n".join(lines)
    if args.no_append:
        print(table)
    else:
        append_results(f"Safetensors reading{' and writing' if args.dtype == 'fp32' else ''} at 1B, {args.dtype}",
                       "python benchmarks/safetensors_io.py " + " ".join(sys.argv[1:]), machine(), table, [])


if __name__ == "__main__":
    main()
