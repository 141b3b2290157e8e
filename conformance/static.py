"""Static checks: seconds, no ML framework import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from registry_spec import __spec_version__
from registry_spec.errors import ModelNotFoundError
from registry_spec.specs import ModelCard

from .checks import HEAVY_MODULES, CheckFailed, Context, check, no_network, run_zoo


def _entry_point(ctx: Context):  # noqa: ANN202
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="zoo.plugins") if ep.name == ctx.plugin]
    if not eps:
        raise CheckFailed(f"an entry point {ctx.plugin!r} in group 'zoo.plugins'", "none installed",
                          "declare it under [project.entry-points.\"zoo.plugins\"] and reinstall")
    return eps[0]


@check("static.entry_point_loads", "static")
def entry_point_loads(ctx: Context) -> None:
    """The entry point loads in isolation (alone in a fresh registry) and registers under its name."""
    from registry_spec.registry import Registry

    with no_network():
        alone = Registry([_entry_point(ctx)], strict=False, disabled=())
    record = alone.plugins.get(ctx.plugin)
    if record is None or record.status != "loaded":
        raise CheckFailed("status 'loaded'", f"{record.status if record else 'absent'}: {record and record.error}")
    if not record.models and not record.components:
        raise CheckFailed("at least one registered model or component", "none",
                          "call register(card) in zoo_register_models or register(info) in zoo_register_components")


@check("static.hookimpls_validate", "static")
def hookimpls_validate(ctx: Context) -> None:
    """Hook implementations match the hookspecs (names and arguments)."""
    import pluggy

    from registry_spec import hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    module = _entry_point(ctx).load()
    try:
        pm.register(module, name=ctx.plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise CheckFailed("hook implementations valid against the zoo hookspecs", str(exc)) from None
    if not pm.hook.zoo_register_models.get_hookimpls() and not pm.hook.zoo_register_components.get_hookimpls():
        raise CheckFailed("a zoo_register_models or zoo_register_components implementation", "none")


@check("static.requires_spec", "static")
def requires_spec(ctx: Context) -> None:
    """The manifest's requires_spec admits the host's spec version."""
    record = ctx.registry.plugins[ctx.plugin]
    if not record.requires_spec:
        raise CheckFailed("a zoo_plugin_manifest with requires_spec", "no manifest")
    if Version(__spec_version__) not in SpecifierSet(record.requires_spec):
        raise CheckFailed(f"a range admitting {__spec_version__}", record.requires_spec)


@check("static.import_hygiene", "static")
def import_hygiene(ctx: Context) -> None:
    """Registering and listing import no ML framework; `zoo models` starts fast."""
    code = textwrap.dedent(f"""
        import sys, time, json
        t = time.perf_counter()
        from registry_spec.registry import Registry
        r = Registry()
        [(e.card.model_dump(), r.handle(e).capabilities) for e in r.models()]
        print(json.dumps({{"heavy": [m for m in {HEAVY_MODULES!r} if m in sys.modules],
                          "seconds": time.perf_counter() - t, "status": r.plugins[{ctx.plugin!r}].status}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise CheckFailed("listing to succeed", out.stderr.strip()[-400:])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if info["heavy"]:
        raise CheckFailed("no ML framework imported while registering and listing", f"imported {info['heavy']}",
                          "defer heavy imports into the components' methods")
    if info["seconds"] > 2.0:
        raise CheckFailed("registry load under 2 s", f"{info['seconds']:.2f} s")


@check("static.components_valid", "static")
def components_valid(ctx: Context) -> None:
    """Every card validates; every component the plugin registers imports lazily (no ML framework pulled in by
    the import) and has its protocol's methods."""
    for entry in ctx.models:
        ModelCard.model_validate(entry.card.model_dump())
    mine = [rc for rc in ctx.registry.components if rc.plugin == ctx.plugin]
    impls = sorted({(rc.info.kind, rc.info.impl) for rc in mine})
    code = textwrap.dedent(f"""
        import json, sys
        from registry_spec.components import instantiate, missing_methods
        out = []
        for kind, impl in {impls!r}:
            before = set(sys.modules)
            try:
                obj = instantiate(impl)
            except Exception as exc:
                out.append([kind, impl, "import", f"{{type(exc).__name__}}: {{exc}}"])
                continue
            heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules and m not in before]
            if heavy:
                out.append([kind, impl, "heavy", ", ".join(heavy)])
            if missing_methods(kind, obj):
                out.append([kind, impl, "protocol", ", ".join(missing_methods(kind, obj))])
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if r.returncode:
        raise CheckFailed("the component check to run", r.stderr.strip()[-400:])
    problems = json.loads(r.stdout.strip().splitlines()[-1])
    hints = {"import": "fix the import string", "heavy": "import the framework inside the methods",
             "protocol": "implement the methods of registry_spec.components' protocol for the kind"}
    if problems:
        kind, impl, what, detail = problems[0]
        raise CheckFailed(f"{kind} {impl} to import lazily and implement its protocol", f"{what}: {detail}",
                          hints[what])


@check("static.show_lists_components", "static")
def show_lists_components(ctx: Context) -> None:
    """`zoo show MODEL --json` lists the plugin's components for a model they serve, with kind, name, plugin, impl."""
    if not ctx.models:
        raise CheckFailed("a model the plugin's components serve", "none")
    entry = ctx.models[0]
    r = run_zoo("show", entry.qualified_name, "--json")
    if r.returncode:
        raise CheckFailed("`zoo show` to succeed", r.stderr[-300:])
    listed = json.loads(r.stdout).get("components", [])
    ours = [c for c in listed if c.get("plugin") == ctx.plugin]
    if not ours or not all({"kind", "name", "plugin", "impl"} <= set(c) for c in ours):
        raise CheckFailed("the plugin's components with kind, name, plugin and impl", str(listed)[:300])


@check("static.unknown_model_error", "static")
def unknown_model_error(ctx: Context) -> None:
    """An unknown model name gives ModelNotFoundError with suggestions, and the CLI exits 2 without a traceback."""
    name = ctx.models[0].card.name + "x"
    try:
        ctx.registry.resolve(name)
    except ModelNotFoundError as exc:
        if not exc.suggestions:
            raise CheckFailed("a 'did you mean' suggestion", "none") from None
    else:
        raise CheckFailed("ModelNotFoundError", f"{name!r} resolved")
    r = run_zoo("show", name)
    if r.returncode != 2 or "Traceback" in r.stderr or "unknown model" not in r.stderr:
        raise CheckFailed("exit 2 with 'unknown model' and no traceback", f"exit {r.returncode}: {r.stderr[-300:]}")


@check("static.bad_spec_error", "static")
def bad_spec_error(ctx: Context) -> None:
    """A bad spec field is named in the error and exits 2 (checked on predict, or convert)."""
    entry = ctx.models[0] if ctx.models else None
    if entry is None:
        raise CheckFailed("a model the plugin serves", "none")
    r = run_zoo("predict", entry.qualified_name, "--prompt", "x", "--max-new-tokens", "0")
    if r.returncode != 2 or "max_new_tokens" not in r.stderr or "Traceback" in r.stderr:
        raise CheckFailed("exit 2 naming 'max_new_tokens'", f"exit {r.returncode}: {r.stderr[-300:]}")


@check("static.cli_lists_and_disables", "static")
def cli_lists_and_disables(ctx: Context) -> None:
    """`zoo plugins` shows the plugin loaded; ZOO_DISABLE_PLUGINS removes it and its models."""
    rows = {p["name"]: p for p in json.loads(run_zoo("plugins", "--json").stdout)}
    if rows.get(ctx.plugin, {}).get("status") != "loaded":
        raise CheckFailed("`zoo plugins` to show it loaded", str(rows.get(ctx.plugin)))
    env = {"ZOO_DISABLE_PLUGINS": ctx.plugin}
    rows = {p["name"]: p for p in json.loads(run_zoo("plugins", "--json", env=env).stdout)}
    models = json.loads(run_zoo("models", "--json", env=env).stdout)
    if rows.get(ctx.plugin, {}).get("status") != "disabled" or any(m["plugin"] == ctx.plugin for m in models):
        raise CheckFailed("the plugin disabled and its models gone", f"{rows.get(ctx.plugin)}")
