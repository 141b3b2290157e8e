"""The conformance kit: WizardCoder passes it; deliberately broken plugins are reported as failures."""

from __future__ import annotations

import json
import os

import pytest
from conftest import zoo
from test_registry import GOOD, fake_plugin

pytest_plugins = ["pytester"]


def statuses(stdout: str) -> dict[str, dict]:
    return {c["id"]: c for c in json.loads(stdout)}


@pytest.mark.parametrize("tier", ["static", "smoke"])
def test_wizardcoder_passes(tier):
    r = zoo("conformance", "wizardcoder", "--tier", tier, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    checks = statuses(r.stdout)
    assert all(c["status"] in ("passed", "skipped") for c in checks.values()), checks
    assert all(c["reason"] for c in checks.values() if c["status"] == "skipped")
    assert checks["static.import_hygiene"]["status"] == "passed"
    if tier == "smoke":
        for check_id in ("predict_deterministic", "convert_round_trip", "tokenizer_round_trip", "preprocess", "train",
                         "export", "eval"):  # every capability the cards claim
            assert checks[f"smoke.{check_id}"]["status"] == "passed", checks[f"smoke.{check_id}"]


LIAR_COMPONENT = """

class Nothing:
    pass

@hookimpl
def zoo_register_components(register):
    from registry_spec.specs import ComponentInfo
    register(ComponentInfo(kind="model", name="nothing", impl="liar_zoo:Nothing", models=["liar-model"]))
"""
BROKEN = {
    # registration imports an ML framework
    "heavy": GOOD.format(name="heavy", req=">=2.0,<3", model="heavy-model").replace(
        "from registry_spec import hookimpl", "import torch  # noqa\nfrom registry_spec import hookimpl"),
    # registers a model component whose object implements nothing of the protocol
    "liar": GOOD.format(name="liar", req=">=2.0,<3", model="liar-model") + LIAR_COMPONENT,
    # written for another major version of the spec
    "future": GOOD.format(name="future", req=">=3.0", model="future-model"),
}
EXPECTED_FAILURE = {"heavy": "static.import_hygiene", "liar": "static.components_valid",
                    "future": "static.entry_point_loads"}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_plugins_fail_the_right_check(tmp_path, name):
    site = fake_plugin(tmp_path / "site", name, BROKEN[name])
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = zoo("conformance", name, "--tier", "static", "--json", env=env)
    assert r.returncode == 1, r.stderr
    checks = statuses(r.stdout)
    assert checks[EXPECTED_FAILURE[name]]["status"] == "failed", checks
    assert checks[EXPECTED_FAILURE[name]]["reason"]


def test_expected_failures_are_reported_as_skipped(tmp_path):
    from conformance import check_plugin
    from registry_spec.registry import Registry

    report = check_plugin("wizardcoder", "static", registry=Registry())
    assert report.ok and report.failed == 0
    missing = check_plugin("no-such-plugin", "static", registry=Registry())
    assert not missing.ok and missing.checks[0].id == "static.plugin_installed"
    r = zoo("conformance", "wizardcoderr")  # on the command line a misspelt name is a usage error
    assert r.returncode == 2 and "did you mean 'wizardcoder'" in r.stderr, r.stderr


def test_pytest_plugin_reports_checks(pytester, tmp_path, monkeypatch):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "conformance.pytest_plugin", "--zoo-plugin", "wizardcoder")
    result.assert_outcomes(passed=1 + 9)
    site = fake_plugin(tmp_path / "site", "liar", BROKEN["liar"])
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = pytester.runpytest_subprocess("-p", "conformance.pytest_plugin", "--zoo-plugin", "liar")
    assert result.parseoutcomes().get("failed") == 1
    result.stdout.fnmatch_lines(["*conformance*static.components_valid*"])
    result = pytester.runpytest_subprocess("-p", "conformance.pytest_plugin", "--zoo-plugin", "liar",
                                           "--zoo-xfail", "static.components_valid=known: no predict yet")
    outcomes = result.parseoutcomes()
    assert "failed" not in outcomes and outcomes.get("skipped") == 1
    plain = pytester.runpytest_subprocess()  # without the option the plugin adds nothing
    plain.assert_outcomes(passed=1)
