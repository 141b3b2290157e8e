"""The cost of the evaluation sandbox: MBPP's 500 canonical solutions (the test split) with 2 workers, in every
sandbox mode this machine has and, with `--baseline REV`, through the guarded-process executor of an earlier
revision (read from git into a temporary folder, not kept in the tree), all in one run, modes interleaved.

    python benchmarks/eval_sandbox.py --baseline 71ca1f6 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

from wizardcoder_plugin.evaluation.execution import MODES, resolve, run_programs  # noqa: E402
from wizardcoder_plugin.evaluation.tasks import load_problems  # noqa: E402


def baseline_runner(rev: str, folder: Path):  # noqa: ANN201
    """run_programs(programs, timeout, workers) of `rev`'s execution.py."""
    source = subprocess.run(["git", "show", f"{rev}:src/wizardcoder_plugin/execution.py"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).parent).stdout
    path = folder / "baseline_execution.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_execution", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return lambda programs, timeout, workers: module.run_programs(programs, timeout, workers, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="git revision whose guarded-process executor to time as well")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    problems = load_problems("mbpp")
    programs = [p.program("mbpp", p.row["code"]) for p in problems]
    runners = {}
    for mode in MODES:
        try:
            box = resolve(mode)
        except Exception as exc:  # noqa: BLE001 - a mode this machine lacks is reported, not fatal
            print(f"{mode}: unavailable ({exc})", file=sys.stderr)
            continue
        runners[mode] = lambda ps, t, w, box=box: run_programs(ps, t, w, box, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            runners[f"guarded process @ {args.baseline}"] = baseline_runner(args.baseline, Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in runners}
        passed: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, run in runners.items():
                t0 = time.perf_counter()
                outs = run(programs, args.timeout, args.workers)
                times[name].append(time.perf_counter() - t0)
                passed[name] = sum(o.passed for o in outs)
                print(f"{name}: {times[name][-1]:.2f} s, {passed[name]}/{len(programs)} passed", file=sys.stderr)
    ref = min(times[f"guarded process @ {args.baseline}"]) if args.baseline else None
    lines = ["| executor | wall (s), each run | passed | vs the baseline |", "|---|---|---|---|"]
    for name, ts in times.items():
        ratio = f"{min(ts) / ref:.2f}×" if ref else "—"
        lines.append(f"| {name} | {', '.join(f'{t:.2f}' for t in ts)} | {passed[name]}/{len(programs)} | {ratio} |")
    command = "python benchmarks/eval_sandbox.py " + " ".join(sys.argv[1:])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (f"\n## Evaluation sandbox: MBPP's 500 canonical solutions, {args.workers} workers, timeout "
            f"{args.timeout:g} s ({stamp})\n\n- command: `{command}`\n- machine: {machine()}\n\n"
            + "\n".join(lines) + "\n")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
