"""Conformance suite for zoo plugins: `check_plugin(name, tier)`, `zoo conformance`, and an opt-in pytest plugin.

Tiers: `static` (no ML framework, seconds), `smoke` (tiny model on CPU, minutes; includes static), `device`
(opt-in: real weights or an accelerator; includes smoke). A capability no model's components provide is skipped
with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import smoke, static  # noqa: F401  (registers the checks)
from .checks import REGISTRY, TIERS, Check, CheckFailed, CheckSkipped, Context, workdir


@dataclass
class CheckResult:
    id: str
    status: str  # passed | failed | skipped
    reason: str = ""
    tier: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "status": self.status, "reason": self.reason, "tier": self.tier}


@dataclass
class Report:
    plugin: str
    tier: str
    checks: list[CheckResult] = field(default_factory=list)

    def _count(self, status: str) -> int:
        return sum(c.status == status for c in self.checks)

    @property
    def passed(self) -> int:
        return self._count("passed")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def ok(self) -> bool:
        return self.failed == 0


def checks_for(tier: str) -> list[Check]:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; one of {TIERS}")
    allowed = TIERS[: TIERS.index(tier) + 1]
    return sorted((c for c in REGISTRY.values() if c.tier in allowed), key=lambda c: TIERS.index(c.tier))


def run_check(chk: Check, ctx: Context, expected_failures: dict[str, str]) -> CheckResult:
    try:
        if chk.capability and not ctx.capable(chk.capability):
            raise CheckSkipped(f"no model of the plugin has components providing {chk.capability!r}")
        chk.func(ctx)
    except CheckSkipped as exc:
        return CheckResult(chk.id, "skipped", str(exc), chk.tier)
    except Exception as exc:  # noqa: BLE001 - a crashing check is a failure of the plugin under test
        reason = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
        if chk.id in expected_failures:
            return CheckResult(chk.id, "skipped", f"expected failure: {expected_failures[chk.id]} ({reason})",
                               chk.tier)
        return CheckResult(chk.id, "failed", reason, chk.tier)
    return CheckResult(chk.id, "passed", chk.doc, chk.tier)


def check_plugin(name: str, tier: str = "static", expected_failures: dict[str, str] | None = None,
                 registry: Any = None) -> Report:
    """Run every check of `tier` (and the tiers below it) against the installed plugin `name`."""
    from registry_spec.registry import Registry

    registry = registry or Registry()
    report = Report(name, tier)
    if name not in registry.plugins:
        report.checks.append(CheckResult("static.plugin_installed", "failed",
                                         f"no plugin {name!r} in entry-point group 'zoo.plugins'", "static"))
        return report
    with workdir() as tmp:
        from pathlib import Path

        ctx = Context(name, registry, Path(tmp))
        for chk in checks_for(tier):
            report.checks.append(run_check(chk, ctx, expected_failures or {}))
    return report


__all__ = ["check_plugin", "checks_for", "run_check", "Report", "CheckResult", "REGISTRY"]
