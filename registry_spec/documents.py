"""YAML or JSON files (spec files, model and run configs), parsed with one clear error for a bad one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

YAML_SUFFIXES = (".yaml", ".yml")


def read_document(path: Path, what: str) -> Any:
    """`path` parsed as YAML (.yaml, .yml) or else JSON; unreadable text or bad syntax is an InputError naming
    `what` ("spec file", "config file"). The caller checks that the file exists, with its own hint."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in YAML_SUFFIXES:
            import yaml

            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(_yaml_problem(exc)) from None
        return json.loads(text)
    except ValueError as exc:  # JSON and encoding errors are ValueErrors
        kind = "YAML" if path.suffix.lower() in YAML_SUFFIXES else "JSON"
        raise InputError(f"cannot parse {what} {path}: {exc}", f"check its {kind} syntax") from None


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """`read_document`, which must hold a mapping (an empty file: an empty one)."""
    doc = read_document(path, what)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"{what} {path} holds a {type(doc).__name__}, not a mapping of keys to values",
                         "write it as key: value pairs (YAML) or one JSON object")
    return doc


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's error on one line: what went wrong and where (its own text spans lines and quotes the input)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"{context + ', ' if context else ''}{problem} (line {mark.line + 1}, column {mark.column + 1})"
