"""The host: discovery, isolation of broken plugins, collisions, disabling, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import zoo

from registry_spec import __spec_version__
from registry_spec.errors import ModelNotFoundError


def fake_plugin(site: Path, name: str, body: str) -> Path:
    """Install a plugin the way pip would: a module plus a dist-info with a `zoo.plugins` entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{name}_zoo.py").write_text(textwrap.dedent(body))
    info = site / f"{name}_zoo-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-zoo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[zoo.plugins]\n{name} = {name}_zoo\n")
    return site


GOOD = """
from registry_spec import hookimpl
from registry_spec.specs import ModelCard, PluginManifest

@hookimpl
def zoo_plugin_manifest():
    return PluginManifest(name="{name}", version="9.9", requires_spec="{req}")

@hookimpl
def zoo_register_models(register):
    card = ModelCard(name="{model}", family="toy", params=1, context_length=8)
    register(card)
    register(card)  # identical re-registration is a no-op
"""


def run(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return zoo(*args, env={"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env})


def test_builtin_plugin_lists_four_cards_with_exact_counts():
    r = zoo("models", "--json")
    assert r.returncode == 0, r.stderr
    cards = {c["name"]: c for c in json.loads(r.stdout)}
    assert cards["wizardcoder-15b"]["params"] == 15_517_462_528
    assert {"wizardcoder-1b", "wizardcoder-3b", "wizardcoder-tiny"} <= set(cards)
    for c in cards.values():
        assert {"name", "params", "context_length", "capabilities"} <= set(c)
    r = zoo("show", "wizardcoder-15b", "--json")
    card = json.loads(r.stdout)
    assert card["architecture"]["num_layers"] == 40 and card["context_length"] == 8192


def test_unknown_model_suggests_and_exits_2_without_traceback():
    r = zoo("predict", "wizardcoder-15x", "--prompt", "hi")
    assert r.returncode == 2
    assert "wizardcoder-15b" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ModelNotFoundError) as exc:
        from registry_spec.registry import Registry

        Registry().resolve("wizardcodr-tiny")
    assert "wizardcoder-tiny" in exc.value.suggestions


def test_spec_errors_name_the_field():
    r = zoo("predict", "wizardcoder-tiny", "--prompt", "x", "--max-new-tokens", "0")
    assert r.returncode == 2 and "max_new_tokens" in r.stderr and "Traceback" not in r.stderr
    r = zoo("predict", "wizardcoder-tiny", "--prompt", "x", "--top-p", "3")
    assert r.returncode == 2 and "top_p" in r.stderr


def test_output_paths_of_the_wrong_kind_are_refused_before_the_work(tmp_path):
    """A file where a folder is written and a folder where a file is: the spec refuses them (exit 2, no model
    built), where they used to fail with a traceback after the generation or evaluation had run."""
    from pydantic import ValidationError

    from registry_spec.specs import EvalSpec, ExportSpec, PredictSpec, PreprocessSpec, TrainSpec

    (tmp_path / "file").write_text("x")
    folder, file = tmp_path, tmp_path / "file"
    for cls, fields in ((PredictSpec, {"output": folder, "prompt": ["x"]}), (PreprocessSpec, {"input": file,
                        "output": folder}), (ExportSpec, {"output_dir": file}), (TrainSpec, {"output_dir": file}),
                        (EvalSpec, {"output_dir": file})):
        with pytest.raises(ValidationError, match="is a f"):
            cls(model="m", **fields)
    assert PredictSpec(model="m", prompt=["x"], output=folder / "new.jsonl").output == folder / "new.jsonl"
    r = zoo("predict", "wizardcoder-tiny", "--prompt", "x", "--output", str(folder))
    assert r.returncode == 2 and f"output: {folder} is a folder" in r.stderr and "mindspore" not in r.stderr.lower()
    r = zoo("eval", "wizardcoder-tiny", "--task", "mbpp", "--output-dir", str(file))
    assert r.returncode == 2 and f"output_dir: {file} is a file" in r.stderr, r.stderr


def test_spec_file_and_flags_win(tmp_path):
    from registry_spec.cli import build_parser, build_spec
    from registry_spec.specs import PredictSpec

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("max_new_tokens: 5\ntemperature: 0.5\nprompt: [a]\n")
    args = build_parser().parse_args(["predict", "m", "--spec", str(spec_file), "--max-new-tokens", "7",
                                      "--stop", "a,b", "--no-use-cache"])
    spec = build_spec(PredictSpec, args)
    assert (spec.max_new_tokens, spec.temperature, spec.prompt, spec.stop, spec.use_cache) == (7, 0.5, ["a"],
                                                                                               ["a,b"], False)
    spec_file.write_text("bogus_field: 1\n")
    r = zoo("predict", "wizardcoder-tiny", "--spec", str(spec_file))
    assert r.returncode == 2 and "bogus_field" in r.stderr


def test_unclaimed_capability_is_refused(tmp_path):
    site = fake_plugin(tmp_path / "site", "toy", GOOD.format(name="toy", req=">=2.0,<3", model="toy-model"))
    r = run(site, "bench", "toy-model")  # its card claims no capability
    assert r.returncode == 2 and "does not support 'bench'" in r.stderr


def test_discovery_collision_and_qualified_names(tmp_path):
    site = tmp_path / "site"
    fake_plugin(site, "alpha", GOOD.format(name="alpha", req=">=2.0,<3", model="wizardcoder-tiny"))
    r = run(site, "models", "--json")
    assert r.returncode == 0, r.stderr
    origins = sorted(c["plugin"] for c in json.loads(r.stdout) if c["name"] == "wizardcoder-tiny")
    assert origins == ["alpha", "wizardcoder"]
    r = run(site, "show", "wizardcoder-tiny")
    assert r.returncode == 2 and "alpha:wizardcoder-tiny" in r.stderr and "wizardcoder:wizardcoder-tiny" in r.stderr
    r = run(site, "show", "alpha:wizardcoder-tiny", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["plugin"] == "alpha"
    r = run(site, "show", "wizardcoder-15b", "--json")  # unambiguous names still resolve
    assert r.returncode == 0
    r = run(site, "models", "--json", ZOO_STRICT_PLUGINS="1")
    assert r.returncode == 2 and "registered by" in r.stderr


def test_broken_plugins_are_isolated_and_reported(tmp_path):
    site = tmp_path / "site"
    fake_plugin(site, "boom", "raise RuntimeError('kaboom at import')\n")
    fake_plugin(site, "badhook", "from registry_spec import hookimpl\n@hookimpl\ndef zoo_register_modelz(register):\n"
                                 "    pass\n")
    fake_plugin(site, "oldspec", GOOD.format(name="oldspec", req=">=0.1,<1", model="old-model"))
    fake_plugin(site, "twice", GOOD.format(name="twice", req=">=2.0,<3", model="twice-model") + """
@hookimpl
def zoo_register_components(register):
    from registry_spec.specs import ComponentInfo
    register(ComponentInfo(kind="tokenizer", name="tok", impl="twice_zoo:A", models=["twice-model"]))
    register(ComponentInfo(kind="tokenizer", name="tok", impl="twice_zoo:A", models=["twice-model"]))  # no-op
    register(ComponentInfo(kind="tokenizer", name="tok", impl="twice_zoo:B", models=["twice-model"]))
""")
    r = run(site, "plugins", "--json")
    assert r.returncode == 0, r.stderr
    rows = {p["name"]: p for p in json.loads(r.stdout)}
    assert rows["boom"]["status"] == "failed" and "kaboom" in rows["boom"]["error"]
    assert rows["badhook"]["status"] == "failed" and "zoo_register_modelz" in rows["badhook"]["error"]
    assert rows["oldspec"]["status"] == "failed" and __spec_version__ in rows["oldspec"]["error"]
    assert rows["twice"]["status"] == "failed" and "tokenizer 'tok' registered twice" in rows["twice"]["error"]
    assert rows["wizardcoder"]["status"] == "loaded" and rows["wizardcoder"]["version"]
    r = run(site, "models", "--json")
    assert r.returncode == 0 and "old-model" not in r.stdout
    r = run(site, "models", ZOO_STRICT_PLUGINS="1")
    assert r.returncode == 2 and "failed to load" in r.stderr


def test_disabling_plugins(tmp_path):
    r = zoo("plugins", "--json", env={"ZOO_DISABLE_PLUGINS": "wizardcoder"})
    rows = {p["name"]: p for p in json.loads(r.stdout)}
    assert rows["wizardcoder"]["status"] == "disabled"
    r = zoo("models", "--json", env={"ZOO_DISABLE_PLUGINS": "wizardcoder"})
    assert json.loads(r.stdout) == []


def test_listing_and_help_import_no_ml_framework():
    code = ("import sys\nfrom registry_spec.cli import main\n"
            "for argv in (['models','--json'], ['show','wizardcoder-15b'], ['plugins']):\n"
            "    main(argv)\n"
            "try:\n    main(['predict','--help'])\nexcept SystemExit:\n    pass\n"
            "import wizardcoder_plugin.plugin\n"
            "heavy = sorted(m for m in ('mindspore','mindformers','torch','transformers','tokenizers') "
            "if m in sys.modules)\nprint('HEAVY', heavy, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr


def test_schemas_match_committed_snapshots():
    from registry_spec.specs import SCHEMA_MODELS

    schema_dir = Path(__file__).resolve().parents[1] / "registry_spec" / "schemas"
    for name, cls in SCHEMA_MODELS.items():
        committed = json.loads((schema_dir / f"{name}.json").read_text())
        assert committed == cls.model_json_schema(by_alias=True), (
            f"{name} drifted from its committed schema: bump __spec_version__ and run "
            "`python -m registry_spec.schemas` to refresh the snapshots")
    r = zoo("spec", "schema", "PredictSpec")
    assert r.returncode == 0 and "max_new_tokens" in json.loads(r.stdout)["properties"]


def test_atomic_outputs_replace_only_earlier_outputs_and_get_ordinary_modes(tmp_path):
    """An output folder replaces an empty folder or an earlier output, never a file or someone's folder (refused
    before any work); files and folders get the umask's modes, not mkstemp's 0600 / mkdtemp's 0700."""
    from registry_spec.atomic import atomic_dir, atomic_path, write_text
    from registry_spec.errors import InputError

    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        with atomic_path(tmp_path / "run.sh") as tmp:
            tmp.write_text("#!/bin/sh\n")
            tmp.chmod(0o755)  # a mode the writer chose stays
        assert (tmp_path / "run.sh").stat().st_mode & 0o777 == 0o755
        out = tmp_path / "out"
        with atomic_dir(out) as tmp:
            (tmp / "graph").write_text("1")
            tmp.chmod(0o700)  # as ms.export leaves it
        assert out.stat().st_mode & 0o777 == 0o755 and (out / "graph").read_text() == "1"
        with atomic_dir(out, lambda folder: (folder / "graph").is_file()) as tmp:
            (tmp / "graph").write_text("2")  # an earlier output of the same kind: replaced
        assert [p.name for p in out.iterdir()] == ["graph"] and (out / "graph").read_text() == "2"
        (tmp_path / "file").write_text("mine")
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "notes.txt").write_text("mine")
        for target, says in ((tmp_path / "file", "is not a folder"), (tmp_path / "home", "is not empty"),
                             (out, "is not empty")):
            ran = []
            with pytest.raises(InputError, match=says), atomic_dir(target) as tmp:
                ran.append(tmp)
            assert not ran
        assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "home" / "notes.txt").read_text() == "mine"
        assert (out / "graph").read_text() == "2"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "file", "home", "out", "run.sh"]
        with atomic_path(Path("/dev/null")) as tmp:  # a device (--output /dev/stdout) is written, never replaced
            assert tmp == Path("/dev/null")
            tmp.write_text("x")
        assert Path("/dev/null").is_char_device()
    finally:
        os.umask(mask)


def test_staged_files_move_everything_or_nothing(tmp_path):
    from registry_spec.atomic import staged_files

    out = tmp_path / "new" / "model"
    with pytest.raises(RuntimeError), staged_files(out) as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        raise RuntimeError("interrupted")
    assert not (tmp_path / "new" / "model").exists()  # a failed run leaves not even the folder it created
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("user file")
    with staged_files(out, last="data") as tmp:
        (tmp / "data").write_text("data")
        (tmp / "data.db").write_text("index")
        assert not (out / "data").exists()  # nothing appears under the final names before the end
    assert sorted(p.name for p in out.iterdir()) == ["data", "data.db", "keep.txt"]
    with pytest.raises(RuntimeError), staged_files(out) as tmp:
        (tmp / "data").write_text("half")
        raise RuntimeError("interrupted")
    assert (out / "data").read_text() == "data" and sorted(p.name for p in out.iterdir()) == [
        "data", "data.db", "keep.txt"]
