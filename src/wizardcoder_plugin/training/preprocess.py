"""`zoo preprocess`: instruction data or plain text -> a MindRecord of fixed-length training rows.

Instruction rows follow the reference (mindformers `research/wizardcoder/wizardcoder_preprocess.py`): prompt =
the WizardCoder template, target = output + `<|endoftext|>`, the prompt+target string tokenized as one, its first
len(tokenize(prompt)) labels set to -100, then truncated or right-padded with `[PAD]` (label -100) to
seq_length + 1 tokens. Plain text is packed: documents joined by `<|endoftext|>`, cut into seq_length + 1 blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from registry_spec.atomic import staged_files
from registry_spec.errors import InputError
from registry_spec.specs import PreprocessResult, PreprocessSpec

from ..text.templates import apply_template

if TYPE_CHECKING:
    from ..text.tokenizer import WizardCoderTokenizer

IGNORE_INDEX = -100
COLUMNS = ("input_ids", "labels")
MAX_REPORTED = 20
_CHUNK = 256  # rows tokenized per batch call


@dataclass
class BadRows:
    """Bad input rows: counted, the first few described, fatal under --strict."""

    strict: bool
    count: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        if self.strict:
            raise InputError(f"{where}: {why}", "fix the row, or drop --strict to skip and count bad rows")
        self.count += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(f"{where}: {why}")


# ------------------------------------------------------------------------------------------------------- readers
def _records(path: Path, bad: BadRows) -> Iterator[tuple[str, object]]:
    """(location, decoded JSON value) for a JSON array file or a JSONL file."""
    if not path.is_file():
        raise InputError(f"input file {path} does not exist", "pass --input FILE (.json, .jsonl or .txt)")
    with path.open("r", encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                             "the file must be one JSON array of objects, or JSONL (one object per line)") from None
        for i, row in enumerate(rows):
            yield f"{path.name}[{i}]", row
        return
    with path.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{n}", json.loads(line)
            except json.JSONDecodeError as exc:
                bad.add(f"{path.name}:{n}", f"invalid JSON ({exc.msg})")


def read_instructions(path: Path, bad: BadRows) -> Iterator[tuple[str, str, str]]:
    """(location, prompt, target); `input` is optional, `instruction` and a non-empty `output` are required."""
    for where, row in _records(path, bad):
        if not isinstance(row, dict):
            bad.add(where, f"expected a JSON object, got {type(row).__name__}")
            continue
        missing = [k for k in ("instruction", "output") if k not in row]
        if missing:
            bad.add(where, f"missing field(s) {', '.join(missing)}")
            continue
        wrong = [k for k in ("instruction", "input", "output") if k in row and not isinstance(row[k], str)]
        if wrong:
            bad.add(where, f"field(s) {', '.join(wrong)} must be strings")
            continue
        if not row["output"].strip():
            bad.add(where, "empty output")
            continue
        yield where, apply_template(row["instruction"], "wizardcoder", row.get("input", "")), row["output"]


def read_texts(path: Path, bad: BadRows) -> Iterator[str]:
    """Documents: a .txt file is one document; JSONL/JSON rows need a string `text` field."""
    if path.suffix == ".txt":
        if not path.is_file():
            raise InputError(f"input file {path} does not exist", "pass --input FILE (.json, .jsonl or .txt)")
        yield path.read_text(encoding="utf-8")
        return
    for where, row in _records(path, bad):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            bad.add(where, "no non-empty string 'text' field")
            continue
        yield text


def detect_format(path: Path) -> str:
    if path.suffix == ".txt":
        return "text"
    bad = BadRows(strict=False)
    for _, row in _records(path, bad):
        if isinstance(row, dict):
            return "instruction" if "instruction" in row else "text"
    return "instruction"


# ----------------------------------------------------------------------------------------------------- row makers
def instruction_row(prompt_ids: list[int], full_ids: list[int], width: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """input_ids and labels of `width` tokens; prompt and padding labelled IGNORE_INDEX."""
    ids = np.full(width, pad_id, dtype=np.int32)
    labels = np.full(width, IGNORE_INDEX, dtype=np.int32)
    n = min(len(full_ids), width)
    ids[:n] = full_ids[:n]
    labels[len(prompt_ids):n] = full_ids[len(prompt_ids):n]
    return ids, labels


def instruction_rows(pairs: Iterator[tuple[str, str, str]], tokenizer: WizardCoderTokenizer, width: int, bad: BadRows,
                     stats: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
    buf: list[tuple[str, str, str]] = []

    def flush() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        prompts = tokenizer.encode_batch([p for _, p, _ in buf])
        fulls = tokenizer.encode_batch([p + t + eos for _, p, t in buf])
        for (where, _, _), p_ids, f_ids in zip(buf, prompts, fulls, strict=True):
            if len(p_ids) >= width - 1:
                bad.add(where, f"prompt has {len(p_ids)} tokens: no room for the response "
                        f"in seq_length {width - 1}")
                continue
            ids, labels = instruction_row(p_ids, f_ids, width, tokenizer.pad_token_id)
            stats["tokens"] += min(len(f_ids), width)
            yield ids, labels
        buf.clear()

    for pair in pairs:
        buf.append(pair)
        if len(buf) >= _CHUNK:
            yield from flush()
    if buf:
        yield from flush()


def packed_rows(texts: Iterator[str], tokenizer: WizardCoderTokenizer, width: int,
                stats: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Documents joined by EOS and cut into `width`-token blocks; labels = input_ids; the tail is dropped."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stats["rows_read"] += 1
        stream.extend(tokenizer.encode(text))
        stream.append(eos)
        while len(stream) >= width:
            block = np.asarray(stream[:width], dtype=np.int32)
            del stream[:width]
            stats["tokens"] += width
            yield block, block.copy()
    stats["dropped_tail_tokens"] = len(stream)


# ------------------------------------------------------------------------------------------------------- writing
def write_mindrecord(path: Path, rows: Iterator[tuple[np.ndarray, np.ndarray]], progress: bool = True,
                     problems: list[str] | None = None) -> int:
    """Rows into `path` (+ its `.db` index), written in a temporary folder and moved into place only when complete;
    none is an error that quotes `problems` (the reader's first bad rows, filled as `rows` runs)."""
    from mindspore.mindrecord import FileWriter
    from tqdm import tqdm

    if path.suffix != ".mindrecord":
        raise InputError(f"output {path} must end in .mindrecord", "e.g. --output data/train.mindrecord")
    written = 0
    # the index moves first, the data last: a reader needs both, and the data file's presence marks completion
    with staged_files(path.parent, last=path.name) as tmp:
        writer = FileWriter(str(tmp / path.name), shard_num=1, overwrite=True)
        writer.set_page_size(1 << 20)  # the 32 MiB default pads small datasets to tens of MB
        writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in COLUMNS}, "wizardcoder")
        batch: list[dict] = []
        for ids, labels in tqdm(rows, desc="preprocess", unit="row", disable=not progress or None, leave=False):
            batch.append({"input_ids": ids, "labels": labels})
            if len(batch) >= 1024:
                writer.write_raw_data(batch)
                written += len(batch)
                batch.clear()
        if batch:
            writer.write_raw_data(batch)
            written += len(batch)
        if written == 0:
            why = "; ".join(problems or []) or "the input has no rows"
            raise InputError(f"no usable rows, nothing written: {why}",
                             "the input must be a JSON array of objects, JSONL (one object per line) or text")
        writer.commit()
    return written


def run_preprocess(spec: PreprocessSpec, tokenizer: WizardCoderTokenizer, progress: bool = True) -> PreprocessResult:
    bad = BadRows(strict=spec.strict)
    fmt = detect_format(spec.input) if spec.format == "auto" else spec.format
    width = spec.seq_length + 1
    stats = {"rows_read": 0, "tokens": 0}  # rows_read: documents (text format)
    if fmt == "instruction":
        pairs = read_instructions(spec.input, bad)
        if spec.limit:
            pairs = (p for i, p in zip(range(spec.limit), pairs, strict=False))
        rows = instruction_rows(pairs, tokenizer, width, bad, stats)
    else:
        texts = read_texts(spec.input, bad)
        if spec.limit:
            texts = (t for i, t in zip(range(spec.limit), texts, strict=False))
        rows = packed_rows(texts, tokenizer, width, stats)
    written = write_mindrecord(spec.output, rows, progress, bad.problems)
    read = (written if fmt == "instruction" else stats["rows_read"]) + bad.count
    return PreprocessResult(output=spec.output, rows_read=read, rows_written=written,
                            rows_skipped=bad.count, tokens=stats["tokens"], problems=bad.problems)


def read_mindrecord(path: Path) -> tuple[int, int]:
    """(rows, row width) of a preprocessed MindRecord, with a clear error when it is not one."""
    from mindspore.mindrecord import FileReader

    if not Path(path).is_file() or not Path(str(path) + ".db").is_file():
        raise InputError(f"training data {path} (and its .db index) not found",
                         "create it with `zoo preprocess MODEL --input FILE --output OUT.mindrecord`")
    try:
        reader = FileReader(str(path), num_consumer=1, columns=list(COLUMNS))
        n = reader.len()
        first = next(reader.get_next())
        reader.close()
    except Exception as exc:  # noqa: BLE001 - MindRecord's own message says what is wrong
        raise InputError(f"cannot read {path} as a MindRecord with columns {COLUMNS}: {exc}",
                         "create it with `zoo preprocess`") from None
    return n, len(first["input_ids"])
