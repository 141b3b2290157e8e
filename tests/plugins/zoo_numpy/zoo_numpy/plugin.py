"""Hooks: components only, for the gpt_bigcode family (no models of its own)."""

from registry_spec import hookimpl
from registry_spec.specs import ComponentInfo, PluginManifest


@hookimpl
def zoo_plugin_manifest():
    return PluginManifest(name="numpy", version="0.1.0", requires_spec=">=2.0,<3")


@hookimpl
def zoo_register_components(register):
    register(ComponentInfo(kind="exporter", name="npz", family="gpt_bigcode", impl="zoo_numpy.backend:NpzExporter",
                           description="weights in one .npz, run by a numpy GPTBigCode"))
    register(ComponentInfo(kind="converter", name="hf-to-npz", family="gpt_bigcode", source="hf", target="npz",
                           impl="zoo_numpy.backend:NpzConverter", description="any checkpoint to one .npz"))
