"""TrainConfig without the CLI: field metadata, checks, config files, merging and replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamalora.config import (DEFAULT_LORA_TARGETS, LR_SCHEDULERS, REPORT_TO_CHOICES,
                              TrainConfig, load_config_file, report_to_names)
from llamalora.errors import ConfigError, UsageError


def test_every_field_has_help_flags_and_underscore_twins():
    specs = TrainConfig.options()
    assert [s.name for s in specs] == list(TrainConfig.__dataclass_fields__)
    for spec in specs:
        assert spec.help.endswith(".") and spec.flags, spec.name
        for decl in spec.flags:
            # One-word booleans (--packing/--no-packing) have no --no_packing twin: the pair
            # --packing/--no_packing would list --packing twice.
            names = decl.split("/") if "-" in decl.split("/")[0][2:] else decl.split("/")[:1]
            for flag in names:
                twin = "--" + flag[2:].replace("-", "_")
                assert any(twin in d.split("/") for d in spec.flags), (spec.name, twin)
        assert (spec.kind is bool) == all("/" in d for d in spec.flags), spec.name
    flags = [f for s in specs for d in s.flags for f in d.split("/")]
    assert len(flags) == len(set(flags))


def test_option_kinds_and_defaults():
    specs = {s.name: s for s in TrainConfig.options()}
    assert (specs["lora_rank"].kind, specs["lora_rank"].default) == (int, 8)
    assert specs["learning_rate"].kind is float and not specs["learning_rate"].optional
    assert specs["compile"].kind is bool and specs["compile"].optional
    assert specs["gradient_checkpointing"].optional and not specs["packing"].optional
    assert "--lr" in specs["learning_rate"].flags
    assert specs["batch_size"].flags[:3] == ("--per-device-train-batch-size",
                                             "--per_device_train_batch_size", "--batch-size")


def test_lora_targets_literal_lives_only_in_config(repo_root):
    assert TrainConfig().target_modules == DEFAULT_LORA_TARGETS == "q_proj,k_proj,v_proj,o_proj"
    holders = [p.relative_to(repo_root).as_posix()
               for p in sorted((repo_root / "llamalora").rglob("*.py"))
               if DEFAULT_LORA_TARGETS in p.read_text(encoding="utf-8")]
    assert holders == ["llamalora/config.py"]


def test_lr_scheduler_names_map_to_transformers():
    # "constant" keeps the warm-up: transformers' own "constant" has none.
    assert LR_SCHEDULERS == {"linear": "linear", "cosine": "cosine",
                             "constant": "constant_with_warmup"}
    assert TrainConfig().lr_scheduler == "linear"
    assert TrainConfig(lr_scheduler="cosine").lr_scheduler == "cosine"
    with pytest.raises(ConfigError, match=r"--lr-scheduler must be one of linear, cosine, "
                                          r"constant, got 'cosine_with_restarts'"):
        TrainConfig(lr_scheduler="cosine_with_restarts")


def test_report_to_names():
    assert REPORT_TO_CHOICES == ("none", "tensorboard", "wandb", "trackio")
    assert report_to_names("none") == [] and TrainConfig().report_to_list() == []
    assert report_to_names(" tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert report_to_names("trackio") == ["trackio"]
    with pytest.raises(ConfigError, match=r"--report-to 'tensorbord,wandb': unknown tensorbord"):
        report_to_names("tensorbord,wandb")
    with pytest.raises(ConfigError, match="none can't be combined"):
        report_to_names("none,wandb")
    with pytest.raises(ConfigError, match="empty list"):
        report_to_names(" , ")
    with pytest.raises(ConfigError, match="'all'"):
        TrainConfig(report_to="all")


@pytest.mark.parametrize("kw, message", [
    ({"weight_decay": -0.1}, "--weight-decay must be 0 or more, got -0.1"),
    ({"max_grad_norm": -1.0}, "--max-grad-norm must be 0 or more, got -1.0"),
    ({"save_total_limit": -1}, "--save-total-limit must be 0 or more"),
    ({"eval_steps": -5}, "--eval-steps must be 0 or more"),
    ({"logging_steps": 0}, "--logging-steps must be positive, got 0"),
    ({"max_seq_length": 8}, "--max-seq-length must be at least 16, got 8"),
    ({"lora_rank": "8"}, r"--lora-rank must be an integer, got '8' \(str\)"),
    ({"lora_rank": True}, r"--lora-rank must be an integer, got True \(bool\)"),
    ({"packing": "no"}, "--packing must be true or false"),
    ({"compile": 1}, r"--compile must be true or false or null \(automatic\)"),
])
def test_checks_quote_the_bad_value(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)


def test_zero_weight_decay_and_clipping_off_are_fine():
    c = TrainConfig(weight_decay=0.0, max_grad_norm=0.0, lora_alpha=16, save_total_limit=0)
    assert (c.weight_decay, c.max_grad_norm, c.lora_alpha) == (0.0, 0.0, 16)


def test_from_sources_layers_defaults_file_flags():
    c = TrainConfig.from_sources({"lora_rank": 16, "seed": 7, "learning_rate": 1e-4},
                                 {"learning_rate": 3e-4, "seed": None, "quant": "4bit"})
    assert (c.lora_rank, c.seed, c.learning_rate, c.quant) == (16, 7, 3e-4, "4bit")
    assert c.batch_size == 2 and c.max_seq_length == 512  # untouched defaults
    assert TrainConfig.from_sources() == TrainConfig()
    with pytest.raises(ConfigError, match="unknown key 'lora_rnak'; did you mean 'lora_rank'"):
        TrainConfig.from_sources({"lora_rnak": 4})


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_keys_take_dashes_underscores_and_flag_names(tmp_path):
    path = _write(tmp_path / "run.yaml", "\n".join([
        "# a scenario file",
        "data-path: data.jsonl",
        "lora_rank: 16",
        "per_device_train_batch_size: 4",
        "lr: 2e-4",          # YAML 1.1 reads this as text
        "lora-alpha: 16",    # an int for a float field
        "packing: no",
        "compile: null",
        "report_to: tensorboard,wandb",
    ]) + "\n")
    values = load_config_file(path)
    assert values == {"data_path": "data.jsonl", "lora_rank": 16, "batch_size": 4,
                      "learning_rate": 2e-4, "lora_alpha": 16, "packing": False,
                      "compile": None, "report_to": "tensorboard,wandb"}
    assert TrainConfig.from_sources(values).report_to_list() == ["tensorboard", "wandb"]


def test_json_file_and_empty_file(tmp_path):
    path = _write(tmp_path / "run.json", json.dumps({"learning_rate": 1e-05, "max_steps": 5}))
    assert load_config_file(path) == {"learning_rate": 1e-05, "max_steps": 5}
    assert load_config_file(_write(tmp_path / "empty.yaml", "# nothing yet\n")) == {}


def test_recorded_run_replays_every_field(tmp_path):
    recorded = TrainConfig(data_path="d.jsonl", output_dir="out", model="tiny", quant="none",
                           lora_rank=4, learning_rate=1e-5, lr_scheduler="cosine",
                           weight_decay=0.01, max_grad_norm=0.5, report_to="tensorboard",
                           gradient_checkpointing=False, compile=None, packing=False,
                           train_on_prompt=True, max_steps=12)
    run = {"llamalora_version": "0.1.0", "config": recorded.to_dict(),
           "plan": {"steps": 12, "records": 4}, "final_train_loss": 0.5, "versions": {}}
    path = _write(tmp_path / "llamalora.json", json.dumps(run, indent=2))
    assert TrainConfig.from_sources(load_config_file(path)) == recorded
    replay = TrainConfig.from_sources(load_config_file(path), {"output_dir": "out2"})
    assert replay.output_dir == "out2" and replay.data_path == "d.jsonl"


@pytest.mark.parametrize("text, message", [
    ("lora_rnak: 4\n", "unknown key 'lora_rnak'; did you mean 'lora_rank'"),
    ("learning-rat: 1.0e-4\n", "unknown key 'learning-rat'; did you mean 'learning_rate'"),
    ("lora_rank: eight\n", r"lora_rank must be an integer, got 'eight' \(str\)"),
    ("learning_rate: fast\n", "learning_rate must be a number, got 'fast'"),
    ("max_steps: 1.5\n", "max_steps must be an integer, got 1.5"),
    ("gradient_checkpointing: maybe\n", r"must be true or false or null \(automatic\)"),
    ("quant: [8bit]\n", r"quant must be a string, got \['8bit'\] \(list\)"),
    ("lr: 1.0e-4\nlearning_rate: 2.0e-4\n", r"learning_rate is given twice \(as 'lr' and "
                                            r"'learning_rate'\)"),
    ("- lora_rank\n", "must hold a mapping of option names to values"),
    ("lora_rank: [\n", "is not valid YAML: .* at line 2, column 1"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    path = _write(tmp_path / "run.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config_file(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


def test_unusable_paths_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is not a file"):
        load_config_file(tmp_path)
    (tmp_path / "llamalora.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"is a folder; pass .*llamalora.json to replay"):
        load_config_file(tmp_path)
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON: .* line 1, column 15"):
        load_config_file(_write(tmp_path / "bad.json", '{"lora_rank": }'))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml is not UTF-8 text"):
        load_config_file(latin)
