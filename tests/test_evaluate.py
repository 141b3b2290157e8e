"""`zoo eval`: the reference's prompts and post-processing, pass@k, the sandbox, loaded generations (canonical
solutions must all pass), resume, shards and merge."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
from conftest import PKG_DATA, SHARED, zoo

from registry_spec.errors import InputError
from registry_spec.specs import EvalSpec
from wizardcoder_plugin.evaluation.execution import run_program
from wizardcoder_plugin.evaluation.tasks import load_problems, pass_at_k, postprocess, run_eval


def rows(name: str) -> list[dict]:
    with gzip.open(PKG_DATA / "eval" / name, "rt") as f:
        return [json.loads(x) for x in f]


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared is not on this machine")
def test_bundled_data_equals_the_shared_files():
    assert [p.row for p in load_problems("mbpp")] == [json.loads(x) for x in
                                                       (SHARED / "data" / "mbpp.test.jsonl").read_text().splitlines()]
    with gzip.open(SHARED / "data" / "HumanEval.jsonl.gz", "rt") as f:
        assert [p.row for p in load_problems("humaneval")] == [json.loads(x) for x in f]


def test_prompts_follow_the_reference():
    mbpp = {p.task_id: p for p in load_problems("mbpp")}
    want = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nCreate a Python script for this problem:\n\nWrite a python function to "
            "remove first and last occurrence of a given character from the string.\nTest examples:\n"
            'assert remove_Occ("hello","l") == "heo"\nassert remove_Occ("abcda","a") == "bcd"\n'
            'assert remove_Occ("PHP","P") == "H"\n\n### Response:')
    assert mbpp["Mbpp/11"].prompt("mbpp") == want
    assert mbpp["Mbpp/493"].problem_text("mbpp").endswith(
        "Test examples:\ncalculate_polygons(startx, starty, endx, endy, radius)")
    he = load_problems("humaneval")[0]
    assert "    " not in he.problem_text("humaneval") and "\t" in he.problem_text("humaneval")
    assert he.prompt("humaneval").endswith("\n\n### Response:")


@pytest.mark.parametrize(("raw", "want"), [
    ("Here:\n```python\ndef f():\n\treturn 1\n```\nDone.", "def f():\n    return 1"),
    ("def f():\n\treturn 1\n\n# Example usage\nprint(f())", "def f():\n    return 1"),
    ('def f():\n    return 1\nif __name__ == "__main__":\n    f()', "def f():\n    return 1"),
    ("def f():\n    return 1\n# Test examples\nassert f() == 1", "def f():\n    return 1"),
    ("prompt ### Response: def g(): pass", " def g(): pass"),
    ("```python\ndef open_fence(): pass", "\ndef open_fence(): pass"),  # the reference strips only when closed
])
def test_postprocess(raw, want):
    assert postprocess(raw) == want


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 5), (5, 5, 2), (7, 2, 7), (200, 17, 10)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert abs(pass_at_k(n, c, k) - exact) < 1e-12


def test_sandbox_basics():
    """The default sandbox (hostile programs: test_sandbox.py)."""
    assert run_program("assert 1 + 1 == 2").passed
    assert run_program("while True: pass", timeout=1).status == "timeout"
    assert not run_program("x = bytearray(8 << 30)").passed  # memory limit, not the machine's
    assert run_program("assert 1 == 2").detail.startswith("AssertionError")


def test_canonical_solutions_pass_in_both_generation_formats(tmp_path):
    # HumanEval, WizardLM / EvalPlus JSONL: every canonical solution passes
    he = rows("HumanEval.jsonl.gz")
    gens = tmp_path / "he.jsonl"
    gens.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": r["canonical_solution"]}) + "\n"
                            for r in he))
    r = zoo("eval", "wizardcoder-tiny", "--task", "humaneval", "--load-generations", str(gens), "--json",
            "--output-dir", str(tmp_path / "he"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["task"], summary["n_problems"], summary["passed"], summary["pass@1"]) == ("humaneval", 164,
                                                                                              164, 1.0)
    assert json.loads((tmp_path / "he" / "summary.json").read_text())["pass@1"] == 1.0
    # MBPP, bigcode harness format (positional over the test split): all 500 in the strongest sandbox (Mbpp/123
    # takes 4-7 s of CPU on a 2-core VM, past the reference's 3 s: the timeout is raised for this check only)
    mbpp = rows("mbpp.test.jsonl.gz")
    big = tmp_path / "mbpp.json"
    big.write_text(json.dumps([[r["code"]] for r in mbpp]))
    res = run_eval(EvalSpec(model="m", task="mbpp", load_generations=big, timeout=20), lambda: None, progress=False)
    assert (res.n_problems, res.passed) == (500, 500)  # Mbpp/367 needs its setup code after the solution


def test_evalplus_ids_resolve_against_all_974_mbpp_problems(tmp_path):
    full = {r["task_id"]: r for r in rows("mbpp.jsonl.gz")}
    gen_rows = [{"task_id": "Mbpp/700", "completion": full[700]["code"]}, {"task_id": 700, "completion": "x = 1"},
                {"task_id": "2", "completion": full[2]["code"]}]
    gens = tmp_path / "g.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in gen_rows))
    res = run_eval(EvalSpec(model="m", task="mbpp", load_generations=gens), lambda: None, progress=False)
    assert res.n_problems == 2 and res.passed == 2
    assert res.pass_at_1 == pytest.approx((0.5 + 1.0) / 2)  # 700: 1 of 2 samples; 2: 1 of 1
    gens.write_text(json.dumps({"task_id": "Mbpp/9999", "completion": ""}) + "\n")
    with pytest.raises(InputError, match="unknown mbpp task ids Mbpp/9999"):
        run_eval(EvalSpec(model="m", task="mbpp", load_generations=gens), lambda: None, progress=False)
    gens.write_text("not json\n")
    with pytest.raises(InputError, match="g.jsonl:1: invalid JSON"):
        run_eval(EvalSpec(model="m", task="mbpp", load_generations=gens), lambda: None, progress=False)


@pytest.mark.slow
def test_generation_resumes_shards_and_merges(tmp_path):
    common = ["--task", "mbpp", "--max-length", "200", "--json"]
    a = tmp_path / "a"
    r = zoo("eval", "wizardcoder-tiny", *common, "--limit", "2", "--output-dir", str(a))
    assert r.returncode == 0, r.stderr
    first = (a / "generations.jsonl").read_text().splitlines()
    assert [json.loads(x)["task_id"] for x in first] == ["Mbpp/11", "Mbpp/12"]
    with (a / "generations.jsonl").open("a") as f:
        f.write('{"task_id": "Mbpp/13", "prom')  # a run killed mid-line
    r = zoo("eval", "wizardcoder-tiny", *common, "--limit", "3", "--output-dir", str(a))
    assert r.returncode == 0, r.stderr
    again = (a / "generations.jsonl").read_text().splitlines()
    assert again[:2] == first and json.loads(again[2])["task_id"] == "Mbpp/13" and len(again) == 3
    assert json.loads(r.stdout)["n_problems"] == 3
    # a different generation setting in the same folder is refused
    r = zoo("eval", "wizardcoder-tiny", "--task", "mbpp", "--max-length", "300", "--output-dir", str(a))
    assert r.returncode != 0 and "different settings (max_length)" in r.stderr
    # shards 0/2 and 1/2 of the first 4 problems, merged
    for i in (0, 1):
        r = zoo("eval", "wizardcoder-tiny", *common, "--limit", "2", "--shard", f"{i}/2", "--output-dir",
                str(tmp_path / f"s{i}"))
        assert r.returncode == 0, r.stderr
    ids = [json.loads(x)["task_id"] for i in (0, 1) for x in (tmp_path / f"s{i}" / "generations.jsonl")
           .read_text().splitlines()]
    assert ids == ["Mbpp/11", "Mbpp/13", "Mbpp/12", "Mbpp/14"]
    r = zoo("eval", "wizardcoder-tiny", "--task", "mbpp", "--merge", f"{tmp_path / 's0'},{tmp_path / 's1'}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_problems"] == 4
    r = zoo("eval", "wizardcoder-tiny", "--task", "mbpp", "--merge", f"{tmp_path / 's0'},{a}")
    assert r.returncode != 0 and "more than one shard" in r.stderr
    # a shard generated with other settings would make the merged pass@k no one run's
    import shutil

    shutil.copytree(tmp_path / "s1", tmp_path / "s1b")
    meta = tmp_path / "s1b" / "run.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"max_length": 300}))
    r = zoo("eval", "wizardcoder-tiny", "--task", "mbpp", "--merge", f"{tmp_path / 's0'},{tmp_path / 's1b'}")
    assert r.returncode == 2 and "other settings" in r.stderr and "(max_length)" in r.stderr, r.stderr


@pytest.mark.slow
def test_sampling_reports_pass_at_k(tmp_path):
    res = run_eval(EvalSpec(model="wizardcoder-tiny", task="humaneval", limit=1, n_samples=2, temperature=0.8,
                            max_length=384, output_dir=tmp_path), _tiny_generator, progress=False)
    assert set(res.pass_at_k) == {"pass@1", "pass@2"}
    row = json.loads((tmp_path / "generations.jsonl").read_text())
    assert len(row["raw"]) == 2 and row["raw"][0] != row["raw"][1]
    with pytest.raises(InputError, match="identical samples"):
        run_eval(EvalSpec(model="m", task="mbpp", n_samples=2), lambda: None)


def _tiny_generator():
    from registry_spec.registry import Registry
    from registry_spec.specs import PredictSpec

    return Registry().handle("wizardcoder-tiny").generator(PredictSpec(model="wizardcoder-tiny", batch_size=2))


def test_bad_eval_inputs(tmp_path):
    with pytest.raises(InputError, match="index must be in 0..1"):
        run_eval(EvalSpec(model="m", task="mbpp", shard="2/2", output_dir=tmp_path), lambda: None)
    with pytest.raises(InputError, match="number of shards must be at least 1"):
        run_eval(EvalSpec(model="m", task="mbpp", shard="0/0", output_dir=tmp_path), lambda: None)
    from wizardcoder_plugin.evaluation.tasks import canonical_id

    assert [canonical_id("mbpp", x) for x in (11, "11", "Mbpp/11")] == ["Mbpp/11"] * 3
    assert canonical_id("humaneval", "humaneval/3") == "HumanEval/3"
    with pytest.raises(InputError, match="pass --task humaneval"):  # was renumbered into Mbpp/0
        canonical_id("mbpp", "HumanEval/0")
    with pytest.raises(InputError, match="not a humaneval task id"):
        canonical_id("humaneval", "Other/3")
    with pytest.raises(InputError, match="not found"):
        run_eval(EvalSpec(model="m", task="mbpp", data=Path("/nope.jsonl")), lambda: None)
    with pytest.raises(InputError, match="not a finished eval folder"):
        run_eval(EvalSpec(model="m", task="mbpp", merge=[tmp_path]), lambda: None)
