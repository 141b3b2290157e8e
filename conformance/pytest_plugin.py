"""Opt-in pytest plugin: `pytest -p conformance.pytest_plugin --zoo-plugin NAME [--zoo-tier smoke]`.

Adds one test item per conformance check. It is not registered under `pytest11`, so it never loads into other
projects' test runs by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zoo conformance")
    group.addoption("--zoo-plugin", default=None, help="run the zoo conformance checks against this plugin")
    group.addoption("--zoo-tier", default="static", choices=["static", "smoke", "device"])
    group.addoption("--zoo-xfail", action="append", default=[], metavar="ID=REASON",
                    help="an expected failure (repeatable)")


class ConformanceItem(pytest.Item):
    def __init__(self, *, check: Any, state: dict, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check, self.state = check, state

    def runtest(self) -> None:
        from conformance import run_check

        result = run_check(self.check, self.state["ctx"], self.state["xfail"])
        if result.status == "skipped":
            pytest.skip(result.reason)
        if result.status == "failed":
            raise AssertionError(result.reason)

    def reportinfo(self) -> tuple[Path, int, str]:
        return Path(__file__), 0, f"zoo conformance: {self.check.id}"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    name = config.getoption("--zoo-plugin")
    if not name:
        return
    import tempfile

    from conformance import checks_for
    from conformance.checks import Context
    from registry_spec.registry import Registry

    xfail = dict(x.split("=", 1) if "=" in x else (x, "expected") for x in config.getoption("--zoo-xfail"))
    tmp = tempfile.TemporaryDirectory(prefix="zoo-conformance-")
    config.add_cleanup(tmp.cleanup)
    state = {"ctx": Context(name, Registry(), Path(tmp.name)), "xfail": xfail}
    for chk in checks_for(config.getoption("--zoo-tier")):
        items.append(ConformanceItem.from_parent(session, name=f"conformance[{chk.id}]", check=chk, state=state))
