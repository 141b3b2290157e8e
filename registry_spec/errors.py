"""The one error family of the zoo: every error carries a message and a hint for the fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class ZooError(Exception):
    """Base of every error the zoo raises on purpose; the CLI prints `message` and `hint`, exits 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\nhint: {self.hint}" if self.hint else self.message


def close_matches(name: str, known: Iterable[str], n: int = 3) -> tuple[list[str], str]:
    """The known names close to a misspelt `name`, and the "did you mean ...?" that offers them ("" for none)."""
    import difflib

    close = difflib.get_close_matches(name, sorted(set(known)), n=n, cutoff=0.6)
    return close, f"did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def validator_message(msg: str) -> str:
    """A pydantic error's text without the "Value error, " it puts before a validator's own message."""
    return msg.removeprefix("Value error, ")


class ModelNotFoundError(ZooError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        close, hint = close_matches(name, known)
        listing = "run `zoo models` to list the available models"
        super().__init__(f"unknown model {name!r}", f"{hint} {listing}".strip())
        self.name = name
        self.suggestions = close


class AmbiguousModelError(ZooError):
    def __init__(self, name: str, qualified: Sequence[str]) -> None:
        super().__init__(
            f"model name {name!r} is registered by several plugins",
            "use one of the qualified names: " + ", ".join(qualified),
        )
        self.qualified = list(qualified)


class NameCollisionError(ZooError):
    """Raised only in strict mode; otherwise a collision makes the bare name ambiguous."""


class SpecValidationError(ZooError):
    def __init__(self, spec_name: str, problems: Sequence[tuple[str, str]]) -> None:
        lines = "; ".join(f"{path or '<root>'}: {msg}" for path, msg in problems)
        super().__init__(
            f"invalid {spec_name}: {lines}",
            "fix the named fields (flags use the field name with dashes, e.g. --max-new-tokens); "
            "`zoo spec schema` prints every field",
        )
        self.problems = list(problems)

    @classmethod
    def from_pydantic(cls, spec_name: str, exc: Exception) -> SpecValidationError:
        problems = [(".".join(str(p) for p in e["loc"]), validator_message(e["msg"]))
                    for e in exc.errors()]  # type: ignore[attr-defined]
        return cls(spec_name, problems)


class CapabilityNotSupportedError(ZooError):
    def __init__(self, model: str, capability: str, supported: Iterable[str] = ()) -> None:
        sup = ", ".join(sorted(supported)) or "none"
        super().__init__(
            f"model {model!r} does not support {capability!r}",
            f"its capabilities are: {sup} (see `zoo show {model}`)",
        )


class WeightsUnavailableError(ZooError):
    def __init__(self, what: str, searched: Sequence[str], hint: str = "") -> None:
        paths = "\n  ".join(str(s) for s in searched) or "(nothing)"
        super().__init__(
            f"{what} not found; searched:\n  {paths}",
            hint or "pass --weights with a checkpoint file or folder (see `zoo show MODEL` for its converters)",
        )
        self.searched = list(searched)


class BackendUnavailableError(ZooError):
    def __init__(self, backend: str, reason: str, install: str) -> None:
        super().__init__(f"backend {backend!r} is unavailable: {reason}", f"install it with: {install}")


class PluginLoadError(ZooError):
    def __init__(self, plugin: str, error: str) -> None:
        super().__init__(
            f"plugin {plugin!r} failed to load: {error}",
            f"fix or uninstall the plugin, or disable it with ZOO_DISABLE_PLUGINS={plugin}",
        )


class InputError(ZooError):
    """Bad user input that is not a spec field: malformed data files, prompts too long, bad weights."""


class ComponentNotFoundError(ZooError):
    def __init__(self, kind: str, name: str | None, model: str, known: Sequence[str]) -> None:
        what = f"{kind} {name!r}" if name else f"any {kind}"
        hint = f"one of: {', '.join(known)}" if known else \
            f"install a plugin that registers a {kind} for this model (see `zoo plugins`)"
        super().__init__(f"no {what} is registered for model {model!r}", hint)
        self.known = list(known)


class AmbiguousComponentError(ZooError):
    def __init__(self, kind: str, name: str | None, model: str, qualified: Sequence[str]) -> None:
        what = f"{kind} {name!r}" if name else f"{kind} (none named, none the default)"
        super().__init__(f"several plugins register a {what} for model {model!r}",
                         "name one of: " + ", ".join(qualified))
        self.qualified = list(qualified)
