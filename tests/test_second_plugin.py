"""A second plugin, installed by pip as its own distribution (tests/plugins/zoo_numpy), contributes an export
backend and a converter for the gpt_bigcode family: WizardCoder's models gain them through the host alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, zoo

pytestmark = pytest.mark.slow
PROMPT = ["--prompt", "def fib(n):", "--prompt", "print(", "--template", "none", "--max-new-tokens", "10"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "zoo_numpy"
    shutil.copytree(REPO / "tests" / "plugins" / "zoo_numpy", src)
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {"PYTHONPATH": f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def tokens(r):
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line)["token_ids"] for line in r.stdout.splitlines()]


def test_components_listed_for_wizardcoder_models(site):
    show = json.loads(zoo("show", "wizardcoder-tiny", "--json", env=site).stdout)
    theirs = {(c["kind"], c["name"]) for c in show["components"] if c["plugin"] == "numpy"}
    assert theirs == {("exporter", "npz"), ("converter", "hf-to-npz")}
    assert all(c["impl"].startswith("zoo_numpy.") for c in show["components"] if c["plugin"] == "numpy")
    plugins = {p["name"]: p for p in json.loads(zoo("plugins", "--json", env=site).stdout)}
    assert plugins["numpy"]["status"] == "loaded" and not plugins["numpy"]["models"]
    assert len(plugins["numpy"]["components"]) == 2
    # without the plugin the backend is unknown, with the available ones named
    r = zoo("export", "wizardcoder-tiny", "--backend", "npz", "--output-dir", "/tmp/never")
    assert r.returncode == 2 and "no exporter 'npz'" in r.stderr and "mindir" in r.stderr


def test_export_backend_of_another_plugin_equals_online(site, tmp_path, hf_tiny):
    weights = ["--weights", str(hf_tiny), "--config", str(hf_tiny / "config.json")]
    online = tokens(zoo("predict", "wizardcoder-tiny", *weights, *PROMPT, "--json", env=site))
    out = tmp_path / "npz"
    r = zoo("export", "wizardcoder-tiny", *weights, "--backend", "npz", "--output-dir", str(out), "--json", env=site)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["backend"] == "npz" and (out / "weights.npz").is_file()
    exported = tokens(zoo("predict", "wizardcoder-tiny", "--backend", "npz", "--artifacts", str(out),
                          *PROMPT, "--json", env=site))
    assert exported == online


def test_converter_of_another_plugin(site, tmp_path, hf_tiny):
    from safetensors.numpy import load_file

    out = tmp_path / "w.npz"
    r = zoo("convert", "wizardcoder-tiny", "--input", str(hf_tiny), "--output", str(out), "--to", "npz", "--json",
            env=site)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["direction"] == "-> npz"
    reference = load_file(hf_tiny / "model.safetensors")
    with np.load(out) as got:
        assert set(got.files) == set(reference) - {"lm_head.weight"}
        for name in got.files:
            np.testing.assert_array_equal(got[name], reference[name])
    # without --to the model's own default converter still wins
    r = zoo("convert", "wizardcoder-tiny", "--input", str(hf_tiny), "--output", str(tmp_path / "m.safetensors"),
            "--json", env=site)
    assert r.returncode == 0 and json.loads(r.stdout)["direction"] == "-> ms", r.stderr[-1000:]


def test_conformance_of_the_second_plugin(site):
    r = zoo("conformance", "numpy", "--tier", "smoke", "--json", env=site)
    checks = {c["id"]: c for c in json.loads(r.stdout)}
    assert r.returncode == 0, {k: c["reason"] for k, c in checks.items() if c["status"] == "failed"}
    for check_id in ("static.components_valid", "static.show_lists_components", "smoke.export",
                     "smoke.convert_round_trip"):
        assert checks[check_id]["status"] == "passed", checks[check_id]
    assert checks["smoke.train"]["status"] == "skipped"  # it contributes no trainer
