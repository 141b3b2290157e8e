"""`zoo preprocess`: the reference's rows (template, -100 prompt labels, [PAD] padding), packing, bad rows,
atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CODE_ALPACA_SAMPLE, zoo

from registry_spec.errors import InputError
from registry_spec.specs import PreprocessSpec
from wizardcoder_plugin.text.templates import INSTRUCTION, INSTRUCTION_WITH_INPUT
from wizardcoder_plugin.training.preprocess import IGNORE_INDEX, read_mindrecord, run_preprocess

PAD, EOS = 49152, 0


@pytest.fixture(scope="module")
def tok():
    from conftest import BUNDLED_TOKENIZER

    from wizardcoder_plugin.text.tokenizer import WizardCoderTokenizer

    return WizardCoderTokenizer.from_pretrained(BUNDLED_TOKENIZER)


def rows_of(path):
    import mindspore.dataset as ds

    data = ds.MindDataset(str(path), columns_list=["input_ids", "labels"], shuffle=False)
    return [(a.copy(), b.copy()) for a, b in data.create_tuple_iterator(output_numpy=True)]


def test_instruction_rows_follow_the_reference(tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|endoftext|>", pad_token="[PAD]")
    data = [{"instruction": "Add 2 and 3.", "input": "", "output": "def f():\n    return 2 + 3"},
            {"instruction": "Reverse a list.", "input": "[1, 2, 3]", "output": "x[::-1]"},
            {"instruction": "Explain " * 3, "output": "Long answer " * 40}]  # no `input` key; truncated
    src = tmp_path / "d.json"
    src.write_text(json.dumps(data))
    res = run_preprocess(PreprocessSpec(model="m", input=src, output=tmp_path / "o.mindrecord", seq_length=64), tok,
                         progress=False)
    assert (res.rows_read, res.rows_written, res.rows_skipped) == (3, 3, 0)
    rows = rows_of(tmp_path / "o.mindrecord")
    prompts = [INSTRUCTION.format(instruction=data[0]["instruction"]),
               INSTRUCTION_WITH_INPUT.format(instruction=data[1]["instruction"], input=data[1]["input"]),
               INSTRUCTION.format(instruction=data[2]["instruction"])]
    for (ids, labels), prompt, row in zip(rows, prompts, data, strict=True):
        # the reference: tokenize prompt+target as one string, mask len(tokenize(prompt)) labels, pad to seq+1
        full = hf(prompt + row["output"] + "<|endoftext|>")["input_ids"][:65]
        n_prompt = len(hf(prompt)["input_ids"])
        want_ids = full + [PAD] * (65 - len(full))
        want_labels = [IGNORE_INDEX] * n_prompt + full[n_prompt:] + [IGNORE_INDEX] * (65 - len(full))
        assert ids.dtype == np.int32 and labels.dtype == np.int32
        assert ids.tolist() == want_ids
        assert labels.tolist() == want_labels
    assert rows[0][0].tolist().count(EOS) == 1  # the target ends with <|endoftext|>
    assert read_mindrecord(tmp_path / "o.mindrecord") == (3, 65)


def test_bad_rows_are_reported_with_line_numbers_and_skipped(tmp_path, tok):
    lines = ['{"instruction": "ok", "output": "fine"}', "{not json", '{"instruction": "no output"}',
             '{"instruction": 3, "output": "x"}', '{"instruction": "e", "output": "  "}', '[1, 2]',
             '{"instruction": "ok too", "input": "ctx", "output": "yes"}']
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.mindrecord"
    res = run_preprocess(PreprocessSpec(model="m", input=src, output=out, seq_length=64), tok, progress=False)
    assert (res.rows_read, res.rows_written, res.rows_skipped) == (7, 2, 5)
    assert [p.split(":")[1] for p in res.problems] == ["2", "3", "4", "5", "6"]
    assert "invalid JSON" in res.problems[0] and "missing field(s) output" in res.problems[1]
    assert "must be strings" in res.problems[2] and "empty output" in res.problems[3]
    assert "expected a JSON object" in res.problems[4]
    # --strict: the first bad row is fatal and nothing is written, not even a temporary file
    out.unlink()
    (tmp_path / "o.mindrecord.db").unlink()
    with pytest.raises(InputError, match=r"d.jsonl:2: invalid JSON"):
        run_preprocess(PreprocessSpec(model="m", input=src, output=out, seq_length=64, strict=True), tok,
                       progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    # no usable row at all: the error itself quotes the bad rows (there is no result to list them)
    src.write_text('{"instruction": "cut off",\n{"instruction": "no output"}\n')
    with pytest.raises(InputError, match=r"no usable rows.*d.jsonl:1: invalid JSON.*d.jsonl:2: missing field"):
        run_preprocess(PreprocessSpec(model="m", input=src, output=out, seq_length=64), tok, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_text_is_packed_into_full_blocks(tmp_path, tok):
    docs = ["def add(a, b):\n    return a + b\n" * 3, "print('hello')\n", "x = 1234567\n" * 5]
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    res = run_preprocess(PreprocessSpec(model="m", input=src, output=tmp_path / "t.mindrecord", seq_length=15), tok,
                         progress=False)
    stream = [t for d in docs for t in tok.encode(d) + [EOS]]
    rows = rows_of(tmp_path / "t.mindrecord")
    assert res.rows_written == len(stream) // 16 == len(rows)
    assert np.concatenate([r[0] for r in rows]).tolist() == stream[: 16 * len(rows)]
    assert all((ids == labels).all() for ids, labels in rows)


def test_cli_on_code_alpaca_sample_and_clear_errors(tmp_path):
    rows = json.loads(CODE_ALPACA_SAMPLE.read_text())[:40]
    src = tmp_path / "ca.json"
    src.write_text(json.dumps(rows))
    r = zoo("preprocess", "wizardcoder-tiny", "--input", str(src), "--output", str(tmp_path / "ca.mindrecord"),
            "--seq-length", "128", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows_written"] + json.loads(r.stdout)["rows_skipped"] == 40
    r = zoo("preprocess", "wizardcoder-tiny", "--input", str(tmp_path / "missing.json"), "--output",
            str(tmp_path / "x.mindrecord"))
    assert r.returncode != 0 and "does not exist" in r.stderr
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},')
    r = zoo("preprocess", "wizardcoder-tiny", "--input", str(tmp_path / "broken.json"), "--output",
            str(tmp_path / "x.mindrecord"))
    assert r.returncode != 0 and "invalid JSON at line 1" in r.stderr
    assert not list(tmp_path.glob("x.mindrecord*")) and not list(tmp_path.glob(".x.mindrecord*"))
