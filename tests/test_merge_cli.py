"""`taskvec merge` / `taskvec check-merge` end to end, and mergekit YAML configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file
from tiny import perturbed, save_hf, tiny_model, tiny_tokenizer

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.merge import MergeParams, merge_checkpoints
from taskvec.merge.mergekit_yaml import read_mergekit_config


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_model("llama", seed=0)
    save_hf(base, root / "base", tiny_tokenizer())
    fts = [save_hf(perturbed(base, scale=1e-2, seed=s), root / f"ft{s}") for s in (31, 32)]
    return root, root / "base", fts


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.numpy() for k, v in load_file(f).items()})
    return out


def same(a, b):
    ta, tb = tensors(a), tensors(b)
    return set(ta) == set(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_cli_merge_equals_api_and_mergekit_yaml(coll, tmp_path, capsys):
    root, base, fts = coll
    args = ["merge", "--base", str(base), "--method", "dare_ties", str(fts[0]), str(fts[1]), "--weight", "0.6", "0.4",
            "--density", "0.5", "--lambda", "1.2", "--seed", "9", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main(args) == 0
    assert "merged 2 model(s) with dare_ties" in capsys.readouterr().out
    api = merge_checkpoints(base, fts, "dare_ties", MergeParams(weights=(0.6, 0.4), densities=(0.5,), lambda_=1.2,
                                                               seed=9), tmp_path / "api", progress=False)
    assert same(tmp_path / "cli", api)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"""
merge_method: dare_ties
base_model: {base}
models:
  - model: {base}
  - model: {fts[0]}
    parameters: {{weight: 0.6}}
  - model: {fts[1]}
    parameters: {{weight: 0.4}}
parameters:
  density: 0.5
  lambda: 1.2
  rescale: true
  int8_mask: true
random_seed: 9
dtype: float32
""")
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "yml"), "--no-progress"]) == 0
    assert "ignores it" in capsys.readouterr().out
    assert same(tmp_path / "yml", api)
    rec = json.loads((tmp_path / "yml" / "taskvec_merge.json").read_text())
    assert rec["mergekit_config"].endswith("merge.yml") and rec["rescale"]["convention"] == "l1"


def test_mergekit_yaml_defaults_and_unsupported(tmp_path):
    cfg = tmp_path / "a.yml"
    cfg.write_text("merge_method: ties\nbase_model: b\nmodels:\n  - model: x\n  - model: y\n    parameters:\n"
                   "      density: 0.3\nparameters:\n  weight: 0.5\n  density: 0.7\n  normalize: false\n"
                   "out_dtype: bfloat16\n")
    spec = read_mergekit_config(cfg)
    assert spec.method == "ties" and spec.models == ["x", "y"] and spec.base == "b"
    assert spec.params.weights == (0.5, 0.5) and spec.params.densities == (0.7, 0.3)
    assert spec.params.normalize is False and spec.out_dtype == "bfloat16"
    cfg.write_text("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}, {model: y, parameters: "
                   "{weight: 3}}]\n")
    spec = read_mergekit_config(cfg)
    assert spec.base == "x" and spec.models == ["x", "y"] and spec.params.weights == (1.0, 3.0)
    cfg.write_text("merge_method: linear\nbase_model: b\nmodels: [{model: x}]\nparameters: {weight: 2}\n")
    spec = read_mergekit_config(cfg)
    assert spec.models == ["x", "b"] and spec.params.weights == (2.0, 2.0) and spec.base == "b"
    bad = {
        "slices:\n  - sources: []\nmerge_method: ties\n": "slices",
        "merge_method: slerp\nbase_model: b\nmodels: [{model: x}]\n": "slerp",
        "merge_method: ties\nbase_model: b\nmodels:\n  - model: x\n    parameters: {weight: [0, 1]}\n": "gradient",
        "merge_method: ties\nbase_model: b\nmodels:\n  - model: x\n": "no weight",
        "merge_method: ties\nmodels:\n  - model: x\n    parameters: {weight: 1}\n": "needs a base_model",
        "merge_method: ties\nbase_model: b\nmodels:\n  - model: x+lora\n    parameters: {weight: 1}\n": "lora",
        "merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]\n"
        "parameters: {epsilon: 0.1}\n": "epsilon",
        "merge_method: linear\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]\n": "averages base_model",
    }
    for text, msg in bad.items():
        cfg.write_text(text)
        with pytest.raises(TaskvecError, match=msg):
            read_mergekit_config(cfg)


def test_cli_check_merge_and_strict(coll, tmp_path, capsys):
    root, base, fts = coll
    assert main(["merge", "--base", str(base), "--method", "task_arithmetic", str(fts[0]), "--lambda", "0.7",
                 "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    capsys.readouterr()
    args = ["check-merge", "--base", str(base), "--merged", str(tmp_path / "m"), str(fts[0]), str(fts[1]),
            "--out", str(tmp_path / "chk"), "--no-progress", "--strict"]
    assert main(args) == 1  # --strict: an error-level finding (a task left out) fails the check
    out = capsys.readouterr().out
    assert "task_left_out" in out and f"task 1 ({fts[1].name})" in out
    rep = json.loads((tmp_path / "chk" / "check.json").read_text())
    assert abs(rep["lambda_global"][0] - 0.7) <= 1e-5 and abs(rep["lambda_global"][1]) <= 1e-5
    assert (tmp_path / "chk" / "check_merge_layers.png").is_file()


def test_cli_refuses_existing_model_folder(coll, tmp_path, capsys):
    root, base, fts = coll
    out = save_hf(tiny_model("llama", seed=4), tmp_path / "taken")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = main(["merge", "--base", str(base), "--method", "ties", str(fts[0]), "--density", "0.5",
               "--out", str(out), "--no-progress"])
    assert rc == 2 and "already holds a model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc = main(["merge", "--base", str(base), "--method", "ties", str(fts[0]), "--density", "1.5",
               "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "density must lie in (0, 1]" in capsys.readouterr().err
