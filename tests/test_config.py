"""Architecture configs: presets, HF config.json, the reference's mindformers YAML, clear errors."""

from __future__ import annotations

import json

import pytest

from registry_spec.errors import InputError
from wizardcoder_plugin.model.config import PRESETS, GPTBigCodeConfig, load_config


def test_parameter_counts_are_computed_from_shapes():
    assert PRESETS["wizardcoder-15b"].num_parameters() == 15_517_462_528
    assert PRESETS["wizardcoder-15b"].inner_dim == 24576 and PRESETS["wizardcoder-15b"].head_dim == 128


def test_counts_equal_hf_model(hf_model, hf_tiny):
    cfg = load_config(hf_tiny / "config.json")
    hf_count = sum(p.numel() for p in hf_model.parameters())  # tied head counted once by torch
    assert cfg.num_parameters() == hf_count


def test_mindformers_yaml(tmp_path):
    y = tmp_path / "run_wizardcoder.yaml"
    y.write_text("model:\n  model_config:\n    type: WizardCoderConfig\n    seq_length: 2048\n    n_position: 8192\n"
                 "    vocab_size: 49153\n    embedding_size: 6144\n    num_layers: 40\n    num_heads: 48\n"
                 "    expand_ratio: 4\n    hidden_act: gelu\n    eos_token: 0\n    pad_token: 49152\n"
                 "    compute_dtype: float16\n")
    cfg = load_config(y)
    assert cfg.num_parameters() == 15_517_462_528 and cfg.activation_function == "gelu"
    y.write_text("model:\n  model_config:\n    num_layers: 2\n    rotary_base: 10000\n")
    with pytest.raises(InputError, match="rotary_base"):
        load_config(y)


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="llama"):
        load_config(tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "gpt_bigcode", "n_embd": 65, "n_head": 4}))
    with pytest.raises(InputError, match="divisible"):
        load_config(tmp_path / "c.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot parse"):
        load_config(tmp_path / "c.json")
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="holds a list, not a mapping"):
        load_config(tmp_path / "c.json")


def test_malformed_yaml_and_spec_files_exit_2_with_where(tmp_path):
    """A run YAML, a model YAML and a --spec file with bad syntax: one clear error with the line (exit 2), from
    the one reader of YAML / JSON documents (a run YAML used to escape with PyYAML's traceback, exit 1)."""
    from conftest import zoo

    bad = tmp_path / "run.yaml"
    bad.write_text("runner_config:\n  epochs: [1\n")
    r = zoo("train", "wizardcoder-tiny", "--config", str(bad), "--data", str(tmp_path / "d.mindrecord"),
            "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2 and f"cannot parse config file {bad}" in r.stderr and "(line 3, column 1)" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    spec = tmp_path / "spec.yaml"
    spec.write_text("max_new_tokens: 4\nprompt: [a\n")
    r = zoo("predict", "wizardcoder-tiny", "--spec", str(spec))
    assert r.returncode == 2 and f"cannot parse spec file {spec}" in r.stderr and "YAML syntax" in r.stderr
    spec.write_text("- a list\n")
    r = zoo("predict", "wizardcoder-tiny", "--spec", str(spec))
    assert r.returncode == 2 and "not a mapping" in r.stderr


def test_hf_round_trip_of_config():
    cfg = PRESETS["wizardcoder-tiny"]
    from wizardcoder_plugin.model.config import from_hf_dict

    back = from_hf_dict(cfg.to_hf_dict(), seq_length=cfg.seq_length)
    assert back == cfg
    assert isinstance(back, GPTBigCodeConfig)


def test_architecture_is_config_then_the_weights_folder_then_the_card(hf_tiny, tmp_path):
    """As HF's from_pretrained reads a folder's config.json: predict (via the engine) and train use it unless
    --config is given; a checkpoint file or a folder without one leaves the card's preset."""
    from registry_spec.specs import TrainSpec
    from wizardcoder_plugin.model.config import config_file
    from wizardcoder_plugin.training.run_config import resolve_train

    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads((hf_tiny / "config.json").read_text()) | {"n_layer": 3}))
    assert config_file(None, hf_tiny) == hf_tiny / "config.json"
    assert config_file(other, hf_tiny) == other
    assert config_file(None, hf_tiny / "model.safetensors") is None and config_file(None, tmp_path) is None
    data = tmp_path / "d.mindrecord"
    for weights, config, layers in ((hf_tiny, None, 2), (hf_tiny, other, 3), (hf_tiny / "model.safetensors", None,
                                                                                PRESETS["wizardcoder-15b"].n_layer)):
        spec = TrainSpec(model="wizardcoder-15b", data=data, mode="finetune", output_dir=tmp_path / "run",
                         weights=weights, config=config)
        assert resolve_train(spec, "wizardcoder-15b")[1].n_layer == layers
