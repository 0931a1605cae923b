"""`taskvec merge` / `taskvec check-merge` end to end, and mergekit YAML configs."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file
from tiny import base_and_finetunes, save_hf, tiny_model

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.merge import MergeParams, merge_checkpoints
from taskvec.merge.mergekit_yaml import read_mergekit_config


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, *base_and_finetunes(root, "llama", (31, 32))


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
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a model" in err and "--overwrite only replaces taskvec's own models" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc = main(["merge", "--base", str(base), "--method", "ties", str(fts[0]), "--density", "1.5",
               "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "density must lie in (0, 1]" in capsys.readouterr().err


def test_overwrite_replaces_only_a_merge_taskvec_wrote(coll, tmp_path, capsys):
    """--overwrite replaces an earlier merge (or another taskvec output), as the other commands' --overwrite
    does; never a model taskvec did not merge, nor an input; without it the message names --overwrite."""
    root, base, fts = coll
    out = tmp_path / "m"
    args = ["merge", "--base", str(base), "--method", "task_arithmetic", str(fts[0]), "--out", str(out),
            "--no-progress"]
    assert main([*args, "--lambda", "0.5"]) == 0 and (out / ".taskvec-output").is_file()
    first = tensors(out)
    capsys.readouterr()
    assert main([*args, "--lambda", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "already holds a model taskvec built; pass --overwrite to replace it" in err and "\n" not in err.strip()
    assert all(np.array_equal(first[k], v) for k, v in tensors(out).items())
    assert main([*args, "--lambda", "0.7", "--overwrite"]) == 0
    assert json.loads((out / "taskvec_merge.json").read_text())["lambda"] == 0.7
    assert not same(out, base) and not all(np.array_equal(first[k], v) for k, v in tensors(out).items())
    assert not list(tmp_path.glob(".m.*"))  # no partial or old folder left beside it
    # a model taskvec did not merge, and an input (even a merge taskvec wrote), are never replaced
    capsys.readouterr()
    for taken in (save_hf(tiny_model("llama", seed=4), tmp_path / "taken"), base):
        before = {p.name: p.read_bytes() for p in taken.iterdir()}
        assert main(["merge", "--base", str(base), "--method", "task_arithmetic", str(fts[0]), "--out", str(taken),
                     "--overwrite", "--no-progress"]) == 2
        assert {p.name: p.read_bytes() for p in taken.iterdir()} == before
    err = capsys.readouterr().err
    assert "that taskvec did not build" in err and "is one of the input models" in err
    assert main(["merge", "--base", str(base), "--method", "task_arithmetic", str(out), "--out", str(out),
                 "--overwrite", "--no-progress"]) == 2
    assert "is one of the input models" in capsys.readouterr().err
    # another taskvec output (no model in it) is replaced too; a folder taskvec did not write is not
    for name, ours in (("report", True), ("notes", False)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / ("results.json" if ours else "notes.txt")).write_text("{}")
        assert main(["merge", "--base", str(base), "--method", "task_arithmetic", str(fts[0]), "--out",
                     str(folder), "--no-progress"]) == 2
        assert "pass --overwrite" in capsys.readouterr().err
        rc = main(["merge", "--base", str(base), "--method", "task_arithmetic", str(fts[0]), "--out", str(folder),
                   "--overwrite", "--no-progress"])
        assert rc == (0 if ours else 2) and (folder / "taskvec_merge.json").is_file() == ours
        assert ours or "was not written by taskvec" in capsys.readouterr().err


def test_no_density_warns_that_nothing_is_trimmed_or_dropped(coll, tmp_path, capsys):
    """ties / dare_* without a density keep mergekit's default 1 (nothing trimmed or dropped) and say so, on
    the command line and for a mergekit config that sets no density; an explicit density is not warned about."""
    root, base, fts = coll
    common = ["--base", str(base), *map(str, fts), "--no-progress"]
    for method, what in [("ties", "nothing is trimmed and ties is sign election only"),
                         ("dare_linear", "nothing is dropped and dare_linear is plain task arithmetic"),
                         ("dare_ties", "nothing is dropped and dare_ties is sign election only")]:
        assert main(["merge", "--method", method, *common, "--out", str(tmp_path / method)]) == 0
        err = capsys.readouterr().err
        assert f"taskvec merge: warning: {method} without --density: density defaults to 1 (as in mergekit), so " \
               f"{what}; pass --density (e.g. 0.2-0.5)" in err
        rec = json.loads((tmp_path / method / "taskvec_merge.json").read_text())
        assert rec["densities"] == [1.0, 1.0]
    for method, extra in [("ties", ["--density", "0.5"]), ("task_arithmetic", []), ("linear", [])]:
        assert main(["merge", "--method", method, *common, *extra, "--out", str(tmp_path / f"{method}2")]) == 0
        assert "density" not in capsys.readouterr().err
    cfg = tmp_path / "merge.yml"
    head = f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
    for i, (models, top, warned) in enumerate([
            (f"  - model: {fts[0]}\n  - model: {fts[1]}\n", "", "for any model: density defaults to 1"),
            (f"  - model: {fts[0]}\n    parameters: {{density: 0.4}}\n  - model: {fts[1]}\n", "",
             f"for '{fts[1]}': density defaults to 1 (as in mergekit), so none of its entries is dropped"),
            (f"  - model: {fts[0]}\n  - model: {fts[1]}\n", "  density: 0.4\n", None)]):
        cfg.write_text(f"{head}{models}parameters:\n  weight: 0.5\n{top}")
        assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / f"yml{i}"), "--no-progress"]) == 0
        err = capsys.readouterr().err
        if warned:
            assert f"taskvec merge: warning: {cfg}: dare_ties without a density {warned}" in err
            assert "set `density:` (e.g. 0.2-0.5) under parameters" in err and "--density" not in err
        else:
            assert "density" not in err


def test_errors_name_the_finetune_not_its_index(coll, tmp_path, capsys):
    root, base, fts = coll
    common = ["merge", "--base", str(base), *map(str, fts), "--out", str(tmp_path / "x"), "--no-progress"]
    assert main([*common, "--method", "ties", "--density", "0.5", "1.5"]) == 2
    assert f"--density 1.5 for fine-tune '{fts[1]}': density must lie in (0, 1]" in capsys.readouterr().err
    assert main([*common, "--method", "task_arithmetic", "--weight", "1", "nan"]) == 2
    assert f"--weight nan for fine-tune '{fts[1]}': weights must be finite" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_help_states_defaults_and_what_config_replaces(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--base BASE the base (pretrained) model; required unless --config",
                   "merge method; required unless --config", "--no-normalize do not divide by the summed weights",
                   "(default 1)", "DARE drop seed (default 0)", "--overwrite replace an --out folder taskvec wrote"):
        assert needle in text, needle
    assert re.search(r"--lambda LAMBDA global scale λ of the merged task vector \(default 1\)", text)


def test_overwrite_never_loses_what_was_added_to_a_taskvec_output(coll, tmp_path, capsys):
    """--overwrite checks what taskvec wrote against its listing: a report writer never replaces a merged
    model; a model (a trainer's checkpoint-*/) or any file added inside a merge, a file changed in place, or
    a user's model that merely holds a copied taskvec_merge.json are never replaced; merge and apply_to
    replace each other's outputs."""
    from taskvec.vectors import TaskVector

    root, base, fts = coll
    out = tmp_path / "m"
    merge = ["merge", "--base", str(base), "--method", "task_arithmetic", str(fts[0]), "--out", str(out),
             "--no-progress", "--overwrite"]
    assert main(merge) == 0

    def unchanged_after(argv, *want):
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in want), err
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    capsys.readouterr()
    unchanged_after(["vectors", str(base), str(fts[0]), "--out", str(out), "--overwrite", "--basic"],
                    "only `taskvec merge` and TaskVector.apply_to replace a model taskvec built")
    unchanged_after(["check-merge", "--base", str(base), "--merged", str(fts[1]), str(fts[0]), "--out", str(out),
                     "--overwrite"], "only `taskvec merge` and TaskVector.apply_to replace")
    save_hf(tiny_model("gpt2", seed=9), out / "checkpoint-10")  # a trainer wrote into the merge folder
    unchanged_after(merge, "files added or changed since taskvec wrote it", "checkpoint-10/")
    shutil.rmtree(out / "checkpoint-10")
    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # edited in place
    unchanged_after(merge, "files added or changed since taskvec wrote it (config.json)")
    user = save_hf(tiny_model("gpt2", seed=5), tmp_path / "user")
    (user / "taskvec_merge.json").write_text("{}")  # a copied record does not make it ours
    assert main([*merge[:-4], "--out", str(user), "--no-progress", "--overwrite"]) == 2
    assert "lacks taskvec's listing of what it wrote" in capsys.readouterr().err
    # merge and apply_to replace each other's (untouched) outputs
    fresh = tmp_path / "fresh"
    assert main([*merge[:-4], "--out", str(fresh), "--no-progress"]) == 0
    tv = TaskVector.from_checkpoints(base, fts[1], scope="all", progress=False)
    tv.apply_to(base, fresh, overwrite=True, progress=False)
    assert (fresh / "taskvec_applied.json").is_file() and not (fresh / "taskvec_merge.json").exists()
    assert main([*merge[:-4], "--out", str(fresh), "--no-progress", "--overwrite"]) == 0
    assert (fresh / "taskvec_merge.json").is_file() and not (fresh / "taskvec_applied.json").exists()


def test_density_advice_never_precedes_an_error(coll, tmp_path, capsys):
    """ties without --density on inputs that cannot be merged prints the error alone (the advice comes only
    once the inputs are known good)."""
    root, base, fts = coll
    other = save_hf(tiny_model("gpt2", seed=3), tmp_path / "other")
    capsys.readouterr()
    assert main(["merge", "--base", str(base), "--method", "ties", str(fts[0]), str(other), "--out",
                 str(tmp_path / "m"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taskvec merge: error: ") and err.count("\n") == 1 and "without --density" not in err
