"""The `zoo` command line. Flags are generated from the spec models; logs go to stderr, `--json` to stdout."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import signal
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Any

from . import __spec_version__
from .documents import read_mapping
from .errors import InputError, SpecValidationError, ZooError, close_matches

GENERIC = ("convert", "preprocess", "train", "predict", "export", "eval", "bench", "serve")
HELP = {
    "convert": "convert weights between the formats the model's converters name",
    "preprocess": "tokenize a dataset for training",
    "train": "pretrain or finetune a model",
    "predict": "generate text from prompts",
    "export": "export graphs for offline inference",
    "eval": "evaluate on a task registered for the model",
    "bench": "measure throughput",
    "serve": "serve an OpenAI-compatible HTTP API (completions, chat, fill-in-the-middle)",
}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, is_list) with Optional stripped."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else (str, False)
    if origin is list:
        (inner,) = typing.get_args(annotation) or (str,)
        return _unwrap(inner)[0], True
    return annotation, False


def _scalar(tp: Any) -> tuple[Any, list | None]:
    if typing.get_origin(tp) is typing.Literal:
        return str, [str(a) for a in typing.get_args(tp)]
    if typing.get_origin(tp) is typing.Annotated:
        return _scalar(typing.get_args(tp)[0])
    if tp in (int, float):
        return tp, None
    meta = getattr(tp, "__supertype__", None) or getattr(tp, "__origin__", None)
    if meta in (int, float):
        return meta, None
    return str, None


def add_spec_flags(parser: argparse.ArgumentParser, spec_cls: Any, positional: tuple[str, ...] = ("model",)) -> None:
    for name, info in spec_cls.model_fields.items():
        inner, is_list = _unwrap(info.annotation)
        helptext = info.description or ""
        if name in positional:
            parser.add_argument(name, nargs="?" if not info.is_required() else None, default=None, help=helptext)
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(inner, type) and hasattr(inner, "model_fields"):
            continue  # nested models are set through --spec FILE
        if inner is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            continue
        scalar, choices = _scalar(inner)
        if is_list:
            free = bool((info.json_schema_extra or {}).get("free_text"))
            parser.add_argument(flag, dest=name, action="append", default=None, metavar=name.upper(),
                                help=(helptext + " (repeatable)" if free else helptext + " (comma list)").strip())
            parser.set_defaults(**{f"_list_{name}": (scalar, free, choices)})
        else:
            parser.add_argument(flag, dest=name, type=scalar, choices=choices, default=None, help=helptext)


def _flag_values(args: argparse.Namespace, spec_cls: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in spec_cls.model_fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        meta = getattr(args, f"_list_{name}", None)
        if meta is not None:
            scalar, free, _ = meta
            items = value if free else [p for v in value for p in v.split(",") if p]
            value = items if free else [scalar(v) if scalar is not str else v for v in items]
        values[name] = value
    return values


def _read_spec_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"spec file {path!r} does not exist", "pass a YAML or JSON file with --spec")
    return read_mapping(p, "spec file")


def build_spec(spec_cls: Any, args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    data = _read_spec_file(args.spec) if getattr(args, "spec", None) else {}
    data.update(_flag_values(args, spec_cls))  # flags win over the file
    try:
        return spec_cls.model_validate(data)
    except ValidationError as exc:
        raise SpecValidationError.from_pydantic(spec_cls.__name__, exc) from None


# ---------------------------------------------------------------------------------------------------- output
def _out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _card_dict(entry: Any, registry: Any, components: bool = False) -> dict[str, Any]:
    """The card plus what the host resolved: plugin, capabilities (from the components), and on request the
    components themselves."""
    handle = registry.handle(entry)
    d = entry.card.model_dump(mode="json")
    d["plugin"] = entry.plugin
    d["qualified_name"] = entry.qualified_name
    d["capabilities"] = handle.capabilities
    if components:
        d["components"] = [rc.as_dict() for rc in handle.resolved()]
    return d


def _human_params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def cmd_models(args: argparse.Namespace, registry: Any) -> int:
    rows = [_card_dict(e, registry) for e in registry.models()]
    if args.json:
        _out(rows)
        return 0
    for r in rows:
        name = r["qualified_name"] if registry.ambiguous(r["name"]) else r["name"]
        print(f"{name:28} {_human_params(r['params']):>9}  ctx {r['context_length']:<6} "
              f"{r['plugin']:12} {','.join(r['capabilities']) or '-'}")
    if not rows:
        print("no models registered (see `zoo plugins`)", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace, registry: Any) -> int:
    d = _card_dict(registry.resolve(args.model), registry, components=True)
    if args.json:
        _out(d)
        return 0
    for k, v in d.items():
        if k != "components":
            print(f"{k:16} {v}")
    for c in d["components"]:
        formats = f" ({c['source']} -> {c['target']})" if "source" in c else ""
        print(f"{c['kind']:16} {c['name']}{formats}  [{c['plugin']}] {c['impl']}")
    return 0


def cmd_plugins(args: argparse.Namespace, registry: Any) -> int:
    rows = [r.as_dict() for r in registry.plugins.values()]
    if args.json:
        _out(rows)
        return 0
    for r in rows:
        line = f"{r['name']:16} {r['version'] or '-':10} {r['status']:9} models: {', '.join(r['models']) or '-'}"
        kinds = sorted({c["kind"] for c in r["components"]})
        line += f"\n  components: {len(r['components'])} ({', '.join(kinds)})" if r["components"] else ""
        print(line + (f"\n  error: {r['error']}" if r["error"] else ""))
    return 0


def cmd_spec(args: argparse.Namespace, registry: Any) -> int:
    from .specs import SCHEMA_MODELS

    if args.name:
        if args.name not in SCHEMA_MODELS:
            raise InputError(f"unknown spec {args.name!r}", "one of: " + ", ".join(SCHEMA_MODELS))
        _out(SCHEMA_MODELS[args.name].model_json_schema(by_alias=True))
    else:
        _out({name: cls.model_json_schema(by_alias=True) for name, cls in SCHEMA_MODELS.items()})
    return 0


def cmd_generic(args: argparse.Namespace, registry: Any) -> int:
    from . import commands
    from .specs import COMMANDS

    spec_cls, _result_cls = COMMANDS[args.command]
    spec = build_spec(spec_cls, args)
    handle = registry.handle(spec.model)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = commands.run(args.command, handle, spec)
    payload = result.model_dump(mode="json", by_alias=True)
    if args.json:
        if args.command == "predict" and "completions" in payload:
            for c in payload["completions"]:  # one JSON object per prompt per line
                sys.stdout.write(json.dumps(c) + "\n")
        else:
            _out(payload)
    elif not (args.command == "predict" and getattr(spec, "stream", False)):  # streamed text is already out
        _print_human(args.command, payload)
    return 0


def _print_human(command: str, payload: dict[str, Any]) -> None:
    if command == "predict":
        for c in payload["completions"]:
            print(c["text"])
        return
    rows = payload.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):  # a table (bench)
        cols = [k for k, v in rows[0].items() if not isinstance(v, dict | list)]
        widths = [max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(str(r.get(c)).ljust(w) for c, w in zip(cols, widths, strict=True)))
        return
    for k, v in payload.items():
        print(f"{k:20} {v}", file=sys.stdout)


def cmd_conformance(args: argparse.Namespace, registry: Any) -> int:
    from conformance import check_plugin

    if args.plugin not in registry.plugins:  # a usage error (exit 2), not a failed check
        _, hint = close_matches(args.plugin, registry.plugins, n=1)
        raise InputError(f"no plugin {args.plugin!r} is installed",
                         f"{hint} installed: {', '.join(sorted(registry.plugins)) or 'none'} (`zoo plugins`)".strip())
    with contextlib.redirect_stdout(sys.stderr):  # progress of smoke checks must not corrupt --json
        report = check_plugin(args.plugin, tier=args.tier, registry=registry)
    if args.json:
        _out([c.as_dict() for c in report.checks])
    else:
        for c in report.checks:
            print(f"{c.status:8} {c.id:40} {c.reason}")
        print(f"{report.passed} passed, {report.failed} failed, {report.skipped} skipped")
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .specs import COMMANDS

    parser = argparse.ArgumentParser(prog="zoo", description="Model zoo: run registered models by name.")
    parser.add_argument("--version", action="version", version=f"zoo (registry_spec {__spec_version__})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="show one model card")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("plugins", help="list plugins and their load status")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("spec", help="spec models")
    s = p.add_subparsers(dest="spec_command", metavar="SUBCOMMAND", required=True)
    sp = s.add_parser("schema", help="print JSON schemas (all, or NAME)")
    sp.add_argument("name", nargs="?")
    for name in GENERIC:
        spec_cls = COMMANDS[name][0]
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        add_spec_flags(p, spec_cls)
        p.add_argument("--spec", help="YAML or JSON file of spec fields (flags win)")
        p.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    p = sub.add_parser("conformance", help="run the conformance suite against a plugin")
    p.add_argument("plugin")
    p.add_argument("--tier", choices=["static", "smoke", "device"], default="static")
    p.add_argument("--json", action="store_true")
    return parser


COMMAND_FUNCS = {"models": cmd_models, "show": cmd_show, "plugins": cmd_plugins, "spec": cmd_spec,
                 "conformance": cmd_conformance, **{n: cmd_generic for n in GENERIC}}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    # a scheduler's or container's stop (SIGTERM) unwinds like Ctrl-C: `zoo train` saves a checkpoint, temporary
    # outputs are removed; `zoo serve` installs its own (uvicorn's graceful drain)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        from .registry import Registry

        registry = Registry()
        return COMMAND_FUNCS[args.command](args, registry)
    except ZooError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        hint = _FIXABLE.get(exc.errno or 0)
        if exc.errno in (errno.EACCES, errno.EPERM) and not exc.filename:
            hint = None  # not about a path (a refused system call): a bug or a sandbox matter, with its traceback
        if hint is None or args.debug:  # not the machine's state the user can change: a bug, with its traceback
            raise
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        print(f"hint: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that the same cleanup runs."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


# errors of the machine's state (disk, quota, permissions), reported like bad input, with what to change
_SPACE = "free space there, or write the output to another filesystem"
_FIXABLE = {errno.ENOSPC: _SPACE, errno.EDQUOT: _SPACE, errno.EFBIG: "the file size limit (ulimit -f) or the "
            "filesystem cannot hold the output: raise the limit, or write it elsewhere",
            errno.EACCES: "check the path's permissions, or write the output elsewhere",
            errno.EPERM: "check the path's permissions, or write the output elsewhere",
            errno.EROFS: "the filesystem is read-only: write the output elsewhere"}


if __name__ == "__main__":
    sys.exit(main())
