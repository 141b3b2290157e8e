"""`zoo eval`: MBPP and HumanEval with the reference's prompts and post-processing, sandboxed execution, pass@k.

One output folder per run (or shard): `generations.jsonl` (appended problem by problem, so a rerun resumes after
the last complete line), `executions.jsonl` (one line per executed program as it finishes, so a rerun resumes
scoring too), `results.jsonl` (per problem: samples, passes, failure details) and `summary.json`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from registry_spec.atomic import write_json, write_jsonl
from registry_spec.errors import InputError
from registry_spec.specs import EvalResult, EvalSpec

from ..text.templates import INSTRUCTION
from .execution import Outcome, Sandbox, resolve, run_programs

DATA = Path(__file__).parents[1] / "data" / "eval"
DEFAULT_DATA = {"mbpp": DATA / "mbpp.test.jsonl.gz", "humaneval": DATA / "HumanEval.jsonl.gz"}
MBPP_FULL = DATA / "mbpp.jsonl.gz"
INSTRUCTION_PREFIX = "Create a Python script for this problem:\n"
_CUTS = ('if __name__ == "__main__":', "# Example usage", "# Test examples")


@dataclass
class Problem:
    task_id: str  # "Mbpp/11" or "HumanEval/0"
    row: dict

    def problem_text(self, task: str) -> str:
        """The reference's problem statement (every 4 spaces become a tab, as in its generation scripts)."""
        if task == "mbpp":
            text = f"\n{self.row['text']}\nTest examples:"
            if self.row["task_id"] == 493:  # its asserts are too long: the reference gives only the signature
                text += "\ncalculate_polygons(startx, starty, endx, endy, radius)"
            else:
                text += "".join(f"\n{t}" for t in self.row["test_list"])
        else:
            text = self.row["prompt"]
        return text.replace("    ", "\t")

    def prompt(self, task: str) -> str:
        return INSTRUCTION.format(instruction=INSTRUCTION_PREFIX + self.problem_text(task))

    def program(self, task: str, code: str) -> str:
        if task == "mbpp":  # setup code after the candidate: MBPP's setup builds objects of the solution's classes
            setup = self.row.get("test_setup_code") or ""
            return "\n".join([code, setup, *self.row["test_list"]]) + "\n"
        r = self.row
        return f"{r['prompt']}{code}\n\n{r['test']}\n\ncheck({r['entry_point']})\n"


# ---------------------------------------------------------------------------------------------------------- data
def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(f"evaluation data {path} not found", "omit --data to use the bundled copy")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{n}: invalid JSON ({exc.msg})", "pass an MBPP/HumanEval JSONL file") \
                        from None
    return rows


def canonical_id(task: str, raw: object) -> str:
    """11, "11", "Mbpp/11" -> "Mbpp/11"; 0, "HumanEval/0" -> "HumanEval/0"."""
    text = str(raw)
    prefix = "Mbpp/" if task == "mbpp" else "HumanEval/"
    head, _, tail = text.rpartition("/")
    if head and head.lower() != prefix[:-1].lower():  # another dataset's id: never renumbered into this one's
        raise InputError(f"task id {raw!r} is not a {task} task id",
                         f"pass --task {head.lower()}" if head.lower() in DEFAULT_DATA else
                         f"use ids like {prefix}11 or 11")
    if not tail.isdigit():
        raise InputError(f"task id {raw!r} is not a {task} task id", f"use ids like {prefix}11 or 11")
    return prefix + str(int(tail))


def load_problems(task: str, data: Path | None = None) -> list[Problem]:
    rows = _read_jsonl(data or DEFAULT_DATA[task])
    need = ("task_id", "text", "test_list") if task == "mbpp" else ("task_id", "prompt", "test", "entry_point")
    for i, row in enumerate(rows):
        missing = [k for k in need if k not in row]
        if missing:
            raise InputError(f"{data}: row {i + 1} lacks {', '.join(missing)}", f"is it a {task} file?")
    problems = [Problem(canonical_id(task, r["task_id"]), r) for r in rows]
    return sorted(problems, key=lambda p: int(p.task_id.split("/")[1])) if task == "mbpp" else problems


def shard(problems: list[Problem], spec: str | None) -> list[Problem]:
    if not spec:
        return problems
    i, n = (int(x) for x in spec.split("/"))
    if n < 1:
        raise InputError(f"--shard {spec}: the number of shards must be at least 1", "e.g. --shard 0/4")
    if not 0 <= i < n:
        raise InputError(f"--shard {spec}: the index must be in 0..{n - 1}", "e.g. --shard 0/4 ... --shard 3/4")
    return problems[i::n]


# ------------------------------------------------------------------------------------------------ post-processing
def postprocess(text: str) -> str:
    """The reference's extraction: the answer after '### Response:', the ```python block if any, cut before a
    main guard / example usage / test examples, tabs back to 4 spaces."""
    if "### Response:" in text:
        text = text.split("### Response:", 1)[1]
    if "```python" in text:
        text = text[text.index("```python"):].strip().replace("```python", "")
        if "\n```" in text:
            text = text[: text.index("\n```")].strip()
    for cut in _CUTS:
        if cut in text:
            text = text[: text.index(cut)].strip()
    return text.replace("\t", "    ")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ------------------------------------------------------------------------------------------------------- outputs
def read_generations(path: Path) -> list[dict]:
    """The complete rows of one of our JSONL outputs; a torn last line (killed run) is dropped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def load_external_generations(task: str, path: Path, split: list[Problem]) -> dict[str, list[str]]:
    """bigcode-evaluation-harness JSON (a list of lists of code, in the split's task order) or WizardLM / EvalPlus
    JSONL ({task_id, completion} rows; several rows per task are several samples)."""
    if not path.is_file():
        raise InputError(f"generations file {path} not found", "pass --load-generations FILE")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    out: dict[str, list[str]] = {}
    if isinstance(data, list) and all(isinstance(x, list) for x in data):
        if len(data) > len(split):
            raise InputError(f"{path} has {len(data)} entries but the {task} split has {len(split)} problems",
                             "pass the matching --data split")
        for problem, samples in zip(split, data, strict=False):
            if not all(isinstance(s, str) for s in samples):
                raise InputError(f"{path}: entry for {problem.task_id} is not a list of strings",
                                 "bigcode format: [[code, ...], ...]")
            out[problem.task_id] = samples
        return out
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: invalid JSON ({exc.msg})",
                             "use a bigcode JSON list of lists, or JSONL rows {task_id, completion}") from None
        if not isinstance(row, dict) or "task_id" not in row or not isinstance(row.get("completion"), str):
            raise InputError(f"{path}:{n}: expected {{\"task_id\": ..., \"completion\": \"...\"}}",
                             "WizardLM / EvalPlus JSONL format")
        out.setdefault(canonical_id(task, row["task_id"]), []).append(row["completion"])
    return out


# -------------------------------------------------------------------------------------------------------- scoring
def score(task: str, problems: dict[str, Problem], completions: dict[str, list[str]], timeout: float,
          workers: int, progress: bool = True, sandbox: Sandbox | None = None, log: Path | None = None) -> list[dict]:
    """Run every (problem, completion) program. With `log`, each outcome is appended to it as it comes, and a
    rerun takes the outcomes already there for the same program, timeout and sandbox mode."""
    box = sandbox or resolve()
    jobs = [(tid, i, problems[tid].program(task, code)) for tid, codes in completions.items()
            for i, code in enumerate(codes)]
    keys = [f"{tid}#{i}#{hashlib.sha256(prog.encode()).hexdigest()[:16]}#{timeout:g}#{box.mode}"
            for tid, i, prog in jobs]
    known = {row["key"]: row for row in read_generations(log)} if log is not None else {}
    outcomes = {k: {"status": known[k]["status"], "detail": known[k]["detail"]} for k in keys if k in known}
    todo = [j for j, k in enumerate(keys) if k not in outcomes]
    if todo:
        with contextlib.ExitStack() as stack:
            if log is not None:
                write_jsonl(log, known.values())  # drop a torn last line before appending
                f = stack.enter_context(log.open("a", encoding="utf-8"))

            def record(n: int, out: Outcome) -> None:
                outcomes[keys[todo[n]]] = row = {"status": out.status, "detail": out.detail}
                if log is not None:
                    f.write(json.dumps({"key": keys[todo[n]]} | row) + "\n")
                    f.flush()

            run_programs([jobs[j][2] for j in todo], timeout, workers, box, progress, record)
    by_task: dict[str, list] = {tid: [] for tid in completions}
    for (tid, _, _), key in zip(jobs, keys, strict=True):
        by_task[tid].append(outcomes[key])
    return [{"task_id": tid, "n": len(outs), "passed": sum(o["status"] == "passed" for o in outs),
             "results": outs} for tid, outs in by_task.items()]


def summarize(task: str, results: list[dict], output_dir: Path | None) -> EvalResult:
    if not results:
        raise InputError("no problems were evaluated", "check --limit / --shard and the generations file")
    n_min = min(r["n"] for r in results)
    ks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= n_min]
    pass_k = {f"pass@{k}": sum(pass_at_k(r["n"], r["passed"], k) for r in results) / len(results) for k in ks}
    return EvalResult(task=task, n_problems=len(results), passed=sum(r["passed"] > 0 for r in results),
                      **{"pass@1": pass_k["pass@1"]}, pass_at_k=pass_k, output_dir=output_dir)


def finish(task: str, results: list[dict], out: Path | None, extra: dict) -> EvalResult:
    result = summarize(task, results, out)
    if out is not None:
        write_jsonl(out / "results.jsonl", results)
        write_json(out / "summary.json", result.model_dump(mode="json", by_alias=True) | extra)
    return result


def merge(task: str, dirs: list[Path]) -> EvalResult:
    """Combine shard folders into one summary (refusing overlaps, mixed tasks, or shards generated with different
    settings: their pass@k would not be one run's)."""
    results: dict[str, dict] = {}
    first: tuple[Path, dict] | None = None
    for d in dirs:
        summary, res = d / "summary.json", d / "results.jsonl"
        if not summary.is_file() or not res.is_file():
            raise InputError(f"{d} is not a finished eval folder (no summary.json / results.jsonl)",
                             "finish each shard's `zoo eval` first (rerun it: it resumes)")
        shard_task = json.loads(summary.read_text())["task"]
        if shard_task != task:
            raise InputError(f"{d} holds task {shard_task!r}, not {task!r}", f"pass --task {shard_task}")
        if (d / "run.json").is_file():  # absent where the generations were loaded, not made
            settings = {k: v for k, v in json.loads((d / "run.json").read_text()).items() if k != "shard"}
            if first is None:
                first = (d, settings)
            elif settings != first[1]:
                differ = sorted(k for k in settings.keys() | first[1].keys() if settings.get(k) != first[1].get(k))
                raise InputError(f"{d} was generated with other settings than {first[0]} ({', '.join(differ)})",
                                 "merge the shards of one run: the same model, weights and generation settings")
        for line in res.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["task_id"] in results:
                raise InputError(f"{row['task_id']} appears in more than one shard ({d})",
                                 "merge the folders of one sharded run (--shard I/N with the same N)")
            results[row["task_id"]] = row
    ordered = sorted(results.values(), key=lambda r: int(r["task_id"].split("/")[1]))
    return summarize(task, ordered, None)


def generation_stream(todo: list[Problem], task: str, generate: object,
                      batch: int) -> Iterator[tuple[Problem, list[str]]]:
    """(problem, raw completions), a batch of problems at a time."""
    for start in range(0, len(todo), batch):
        chunk = todo[start: start + batch]
        texts = generate([p.prompt(task) for p in chunk])  # type: ignore[operator]
        yield from zip(chunk, texts, strict=True)


def default_output_dir(spec: EvalSpec) -> Path:
    tag = f"-shard{spec.shard.replace('/', 'of')}" if spec.shard else ""
    return Path("eval-output") / f"{spec.model}-{spec.task}{tag}"


def check_spec(spec: EvalSpec) -> None:
    if spec.merge and spec.load_generations:
        raise InputError("--merge and --load-generations cannot be combined", "run them as two commands")
    if spec.n_samples > 1 and spec.temperature == 0:
        raise InputError(f"--n-samples {spec.n_samples} with greedy decoding gives identical samples",
                         "pass --temperature > 0 (e.g. 0.2) for pass@k sampling")


def mbpp_lookup(task: str, split: list[Problem]) -> dict[str, Problem]:
    """Problems by id; MBPP ids resolve against all 974 problems so any subset scores."""
    problems = {p.task_id: p for p in split}
    if task == "mbpp":
        problems = {p.task_id: p for p in load_problems("mbpp", MBPP_FULL)} | problems
    return problems


def eval_progress_json(out: Path, spec: EvalSpec) -> None:
    """Record the run's settings once, so a resumed run with different generation settings is refused."""
    meta = out / "run.json"
    settings = {"task": spec.task, "n_samples": spec.n_samples, "temperature": spec.temperature,
                "top_p": spec.top_p, "max_length": spec.max_length, "shard": spec.shard,
                "weights": str(spec.weights), "model": spec.model}
    if meta.is_file():
        old = json.loads(meta.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise InputError(f"{out} holds a run with different settings ({', '.join(changed)})",
                             "pass another --output-dir, or the same settings to resume")
    else:
        write_json(meta, settings)


def run_eval(spec: EvalSpec, generator_for: object, progress: bool = True) -> EvalResult:
    """The whole command. `generator_for()` returns (engine, tokenizer); it is called only when generating."""
    from tqdm import tqdm

    from registry_spec.generation import GenerationConfig
    from registry_spec.generation import generate as generate_ids

    check_spec(spec)
    if spec.merge:
        result = merge(spec.task, spec.merge)
        if spec.output_dir is not None:
            write_json(spec.output_dir / "summary.json", result.model_dump(mode="json", by_alias=True)
                       | {"merged": [str(d) for d in spec.merge]})
            result = result.model_copy(update={"output_dir": spec.output_dir})
        return result
    split = load_problems(spec.task, spec.data)
    box = sandbox_for(spec)
    if spec.load_generations:
        lookup = mbpp_lookup(spec.task, split)
        completions = load_external_generations(spec.task, spec.load_generations, split)
        unknown = [t for t in completions if t not in lookup]
        if unknown:
            raise InputError(f"{spec.load_generations}: unknown {spec.task} task ids {', '.join(unknown[:5])}",
                             "use the task ids of the dataset (MBPP 1-974, HumanEval/0-163)")
        ids = list(completions)[: spec.limit] if spec.limit else list(completions)
        log = spec.output_dir / "executions.jsonl" if spec.output_dir is not None else None
        results = score(spec.task, lookup, {t: completions[t] for t in ids}, spec.timeout, spec.workers, progress,
                        box, log)
        return finish(spec.task, results, spec.output_dir, {"source": str(spec.load_generations), "sandbox": box.mode})

    problems = shard(split, spec.shard)[: spec.limit] if spec.limit else shard(split, spec.shard)
    out = spec.output_dir or default_output_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    eval_progress_json(out, spec)
    gen_file = out / "generations.jsonl"
    rows = read_generations(gen_file)
    write_jsonl(gen_file, rows)  # drop a torn last line before appending
    done = {row["task_id"]: row["completions"] for row in rows}
    todo = [p for p in problems if p.task_id not in done]
    if todo:
        gen, tok = generator_for()  # type: ignore[operator]
        context = min(spec.max_length, gen.context_length)
        sampling = spec.temperature > 0

        def generate(prompts: list[str]) -> list[list[str]]:
            encoded = [tok.encode(p) for p in prompts]
            fits = [i for i, e in enumerate(encoded) if len(e) < context]
            texts: list[list[str]] = [[""] * spec.n_samples for _ in prompts]  # too long: an empty answer
            if fits:
                batch = [encoded[i] for i in fits for _ in range(spec.n_samples)]
                cfg = GenerationConfig(max_new_tokens=context - min(map(len, batch)), max_length=context,
                                       do_sample=sampling, temperature=spec.temperature if sampling else 1.0,
                                       top_p=spec.top_p, seed=0)
                outs = generate_ids(gen, batch, cfg, tok.eos_token_id, tok.pad_token_id)
                for j, i in enumerate(fits):
                    texts[i] = [tok.decode(o.token_ids) for o in outs[j * spec.n_samples:(j + 1) * spec.n_samples]]
            return texts

        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"generate {spec.task}",
                   unit="problem", disable=not progress or None)
        with gen_file.open("a", encoding="utf-8") as f:
            for problem, raw in generation_stream(todo, spec.task, generate, max(1, spec.batch_size)):
                row = {"task_id": problem.task_id, "prompt": problem.prompt(spec.task), "raw": raw,
                       "completions": [postprocess(r) for r in raw]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                done[problem.task_id] = row["completions"]
                bar.update(1)
        bar.close()
    completions = {p.task_id: done[p.task_id] for p in problems}
    results = score(spec.task, {p.task_id: p for p in problems}, completions, spec.timeout, spec.workers, progress,
                    box, out / "executions.jsonl")
    return finish(spec.task, results, out, {"model": spec.model, "shard": spec.shard, "sandbox": box.mode})


def sandbox_for(spec: EvalSpec) -> Sandbox:
    """The sandbox `--sandbox` names (`auto`: the strongest that works here), said on stderr."""
    box = resolve(spec.sandbox)
    warning = "warning: " if box.mode == "process" else ""
    print(f"{warning}zoo eval: generated programs run in sandbox mode {box.describe()}", file=sys.stderr)
    return box

