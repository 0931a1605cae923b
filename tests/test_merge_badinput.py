"""`taskvec merge` / `check-merge` refuse bad inputs with one clear line and write nothing: NaN/Inf in a base
or fine-tune, non-positive numeric options, a fine-tune listed twice, broken YAML, a fine-tune lacking or
reshaping a base tensor; `check-merge --overwrite`; tensors a fine-tune holds beyond the base are named, not refused."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny import CORPUS, base_and_finetunes, edited, perturbed, save_hf, tiny_tokenizer

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.merge import MergeParams, merge_checkpoints
from taskvec.merge.check import check_merge

BIG = "transformer.h.0.mlp.c_fc.weight"
NAN_AT = r"model\.safetensors.*'transformer\.h\.0\.mlp\.c_fc\.weight'.*NaN/Inf"


def poison(value):
    def edit(sd):
        sd[BIG][1, 2] = value
    return edit


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    _, fts = base_and_finetunes(root, "gpt2", (51, 52))
    nan_ft = edited(fts[1], root / "nanft", poison(float("nan")))
    inf_base = edited(root / "base", root / "infbase", poison(float("inf")))
    merged = merge_checkpoints(root / "base", fts, "task_arithmetic", MergeParams(weights=(0.5, 0.8)),
                               root / "merged", progress=False)
    return root, root / "base", fts, nan_ft, inf_base, merged


def nothing_written(out):
    """Neither the output folder nor a hidden partial folder beside it exists."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", MergeParams()),
    ("linear", MergeParams()),
    ("ties", MergeParams(densities=(0.5,))),
    ("ties", MergeParams(densities=(0.5,), trim="global")),
    ("dare_ties", MergeParams(densities=(0.5,))),
])
def test_merge_refuses_nan_in_a_finetune(coll, tmp_path, method, params):
    root, base, fts, nan_ft, _, _ = coll
    out = tmp_path / "o" / "m"
    with pytest.raises(TaskvecError, match=r"nanft/" + NAN_AT):
        merge_checkpoints(base, [fts[0], nan_ft], method, params, out, progress=False)
    assert nothing_written(out)


def test_merge_refuses_nonfinite_base_merged_or_copied(coll, tmp_path):
    root, _, fts, _, inf_base, _ = coll
    for scope in ("all", "attention"):  # c_fc merged, then copied from the base: Inf would land in the output
        out = tmp_path / scope / "m"
        with pytest.raises(TaskvecError, match=r"infbase/" + NAN_AT + ".*base.*re-export"):
            merge_checkpoints(inf_base, fts, "ties", MergeParams(densities=(0.5,)), out, scope=scope, progress=False)
        assert nothing_written(out)


def test_cli_merge_nan_is_one_line_exit_2(coll, tmp_path, capsys):
    root, base, fts, nan_ft, _, _ = coll
    out = tmp_path / "m"
    rc = main(["merge", "--base", str(base), "--method", "ties", str(fts[0]), str(nan_ft), "--density", "0.5",
               "--out", str(out), "--no-progress"])
    assert rc == 2 and nothing_written(out)
    one_line_error(capsys, str(nan_ft), BIG, "NaN/Inf", "--scope")


def test_merge_refuses_half_precision_overflow(coll, tmp_path):
    root, base, fts, _, _, _ = coll
    out = tmp_path / "m"
    with pytest.raises(TaskvecError, match="overflows float16.*--dtype float32"):
        merge_checkpoints(base, fts, "task_arithmetic", MergeParams(lambda_=1e7), out, out_dtype="float16",
                          progress=False)
    assert nothing_written(out)
    with pytest.raises(TaskvecError, match="overflows float32.*lower --lambda") as exc:  # Inf made by the fp32 sum
        merge_checkpoints(base, fts, "task_arithmetic", MergeParams(lambda_=1e39), out, out_dtype="float32",
                          progress=False)
    assert nothing_written(out)
    # λ = 1e39 is Inf in float32 and Inf·0 = NaN: the message counts the non-finite values, never prints 'nan'
    assert "in the merge arithmetic" in str(exc.value) and re.search(r"\(\d+ of \d+ values NaN/Inf\)", str(exc.value))
    assert "nan" not in str(exc.value) and "largest" not in str(exc.value)


def test_check_merge_refuses_nonfinite_base_or_finetune(coll, tmp_path, capsys):
    root, base, fts, nan_ft, inf_base, merged = coll
    with pytest.raises(TaskvecError, match=r"nanft/" + NAN_AT):
        check_merge(base, merged, [fts[0], nan_ft], progress=False)
    with pytest.raises(TaskvecError, match=r"infbase/" + NAN_AT):
        check_merge(inf_base, merged, fts, progress=False)
    out = tmp_path / "chk"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on the way to the error
        rc = main(["check-merge", "--base", str(base), "--merged", str(merged), str(fts[0]), str(nan_ft),
                   "--out", str(out), "--no-progress"])
    assert rc == 2 and nothing_written(out)
    one_line_error(capsys, str(nan_ft), BIG, "NaN/Inf")


def test_numeric_options_must_be_positive(coll, tmp_path, capsys):
    root, base, fts, _, _, merged = coll
    data = []
    for t in range(2):
        data.append(tmp_path / f"t{t}.jsonl")
        data[-1].write_text("".join(json.dumps({"prompt": CORPUS[i], "target": " ok"}) + "\n" for i in range(3)))
    common = ["check-merge", "--base", str(base), "--merged", str(merged), *map(str, fts), "--no-progress",
              "--data", *map(str, data), "--output", "logprob"]
    for flag in ("--batch-size", "--max-length"):
        out = tmp_path / flag.strip("-")
        assert main([*common, "--out", str(out), flag, "0"]) == 2 and nothing_written(out)
        one_line_error(capsys, f"{flag} 0", "positive")
    out = tmp_path / "shards"
    assert main(["merge", "--base", str(base), "--method", "task_arithmetic", *map(str, fts), "--out", str(out),
                 "--max-shard-size", "0", "--no-progress"]) == 2 and nothing_written(out)
    one_line_error(capsys, "--max-shard-size", "not positive")


def test_check_merge_overwrite(coll, tmp_path, capsys):
    root, base, fts, _, _, merged = coll
    out = tmp_path / "chk"
    args = ["check-merge", "--base", str(base), "--merged", str(merged), "--out", str(out), "--no-progress"]
    assert main([*args, str(fts[0])]) == 0
    assert len(json.loads((out / "check.json").read_text())["lambda_global"]) == 1
    capsys.readouterr()
    assert main([*args, *map(str, fts)]) == 2
    one_line_error(capsys, "--overwrite")
    assert main([*args, *map(str, fts), "--overwrite"]) == 0  # the earlier report is replaced
    rep = json.loads((out / "check.json").read_text())
    assert [round(x, 4) for x in rep["lambda_global"]] == [0.5, 0.8]
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    capsys.readouterr()
    rc = main(["check-merge", "--base", str(base), "--merged", str(merged), *map(str, fts), "--out", str(base),
               "--overwrite", "--no-progress"])
    assert rc == 2 and {p.name: p.read_bytes() for p in base.iterdir()} == before  # an input is never replaced
    one_line_error(capsys, "never replaces")


def test_duplicate_finetunes_are_refused(coll, tmp_path, capsys):
    root, base, fts, _, _, merged = coll
    again = f"{fts[0].parent}/./{fts[0].name}/"  # the same folder spelled differently
    out = tmp_path / "m"
    with pytest.raises(TaskvecError, match="given twice.*list each fine-tune once"):
        merge_checkpoints(base, [fts[0], fts[1], again], "task_arithmetic", MergeParams(), out, progress=False)
    assert nothing_written(out)
    with pytest.raises(TaskvecError, match="given twice"):
        check_merge(base, merged, [fts[0], again], progress=False)
    rc = main(["check-merge", "--base", str(base), "--merged", str(merged), str(fts[0]), again,
               "--out", str(tmp_path / "chk"), "--no-progress"])
    assert rc == 2 and nothing_written(tmp_path / "chk")
    one_line_error(capsys, f"fine-tune '{fts[0]}' is given twice (as '{fts[0]}' and '{again}')")
    rc = main(["merge", "--base", str(base), "--method", "ties", str(fts[0]), again, "--density", "0.5",
               "--out", str(out), "--no-progress"])
    assert rc == 2 and nothing_written(out)
    one_line_error(capsys, "given twice", "--weight")


def test_broken_yaml_is_one_line_with_position(coll, tmp_path, capsys):
    root, base, fts, _, _, _ = coll
    cfg = tmp_path / "bad.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n   parameters: "
                   "{weight: 1}\n")
    out = tmp_path / "m"
    assert main(["merge", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert nothing_written(out)
    one_line_error(capsys, f"{cfg}:5:", "not valid YAML", "indentation")


def test_copies_of_a_finetune_or_of_the_base_and_out_inside_an_input_are_refused(coll, tmp_path, capsys):
    """Byte-identical fine-tunes under other paths (a `cp -r` copy, the base itself) would count double or
    merge a zero τ; an --out inside an input folder would modify an input."""
    import shutil

    root, base, fts, _, _, _ = coll
    copy = shutil.copytree(fts[0], tmp_path / "copy")
    out = tmp_path / "m"
    with pytest.raises(TaskvecError, match=re.escape(f"fine-tune '{copy}' has the same content as fine-tune "
                                                     f"'{fts[0]}'")):
        merge_checkpoints(base, [fts[0], copy], "task_arithmetic", MergeParams(), out, progress=False)
    with pytest.raises(TaskvecError, match=re.escape(f"fine-tune '{base}' has the same content as the base "
                                                     f"'{base}'")):
        merge_checkpoints(base, [base, fts[1]], "task_arithmetic", MergeParams(), out, progress=False)
    assert nothing_written(out)
    inside = fts[0] / "merged"
    rc = main(["merge", "--base", str(base), "--method", "ties", str(fts[0]), str(fts[1]), "--density", "0.5",
               "--out", str(inside), "--no-progress"])
    assert rc == 2 and not inside.exists()
    one_line_error(capsys, "lies inside the input folder")


def test_config_that_is_a_folder_or_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "b.yml"
    bad.write_bytes(b"\xff\xfemerge_method: ties\n")
    for cfg, words in [(tmp_path, "is a folder"), (bad, "not UTF-8")]:
        assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
        one_line_error(capsys, words)


HEAD = {"score.weight": (2, 32), "score.bias": (2,), "transformer.h.2.ln_1.weight": (32,),
        "transformer.h.2.ln_1.bias": (32,), "transformer.h.2.mlp.c_fc.weight": (32, 128)}


def test_tensors_beyond_the_base_are_named_not_refused(coll, tmp_path, capsys):
    """A fine-tune with an added head and an extra layer is merged and checked over the base's tensors; its
    extra tensors are named in one TaskvecWarning (the CLI's 'taskvec CMD: warning:' line; first few + count)
    and recorded per fine-tune."""
    root, base, fts, _, _, _ = coll

    def add(sd):
        sd.update({name: torch.ones(shape) for name, shape in HEAD.items()})

    headft = edited(fts[1], tmp_path / "headft", add)
    out = tmp_path / "m"
    assert main(["merge", "--base", str(base), "--method", "task_arithmetic", str(fts[0]), str(headft),
                 "--out", str(out), "--no-progress"]) == 0
    err = one_line_error(capsys, f"taskvec merge: warning: {headft} holds 5 tensor(s) the base lacks", "(+2 more)",
                         "not merged", "extra_tensors_ignored")
    assert sum(name in err for name in HEAD) == 3
    rec = json.loads((out / "taskvec_merge.json").read_text())
    assert {k: sorted(v) for k, v in rec["extra_tensors_ignored"].items()} == {str(headft): sorted(HEAD)}
    assert not set(load_file(out / "model.safetensors")) & set(HEAD)
    chk = tmp_path / "chk"
    assert main(["check-merge", "--base", str(base), "--merged", str(out), str(fts[0]), str(headft),
                 "--out", str(chk), "--no-progress"]) == 0
    one_line_error(capsys, f"taskvec check-merge: warning: {headft} holds 5 tensor(s) the base lacks", "not checked",
                   "finetune_extra_tensors")
    rep = json.loads((chk / "check.json").read_text())
    assert {k: sorted(v) for k, v in rep["finetune_extra_tensors"].items()} == {str(headft): sorted(HEAD)}
    assert rep["classification"] == "task_arithmetic" and rep["extra_tensors"] == []


def test_finetune_missing_or_reshaping_a_base_tensor_is_one_line(coll, tmp_path, capsys):
    root, base, fts, _, _, merged = coll

    def drop(sd):
        del sd[BIG]

    def narrow(sd):
        sd[BIG] = sd[BIG][:, :100].contiguous()

    for edit, needles in [(drop, ["lacks tensor", f"'{BIG}'"]), (narrow, [f"'{BIG}'", "(32, 100)", "(32, 128)"])]:
        bad = edited(fts[1], tmp_path / edit.__name__, edit)
        out = tmp_path / f"m_{edit.__name__}"
        assert main(["merge", "--base", str(base), "--method", "task_arithmetic", str(fts[0]), str(bad),
                     "--out", str(out), "--no-progress"]) == 2 and nothing_written(out)
        assert "more)" not in one_line_error(capsys, str(bad), *needles)
        out = tmp_path / f"c_{edit.__name__}"
        assert main(["check-merge", "--base", str(base), "--merged", str(merged), str(fts[0]), str(bad),
                     "--out", str(out), "--no-progress"]) == 2 and nothing_written(out)
        one_line_error(capsys, str(bad), *needles)


def test_finetune_lacking_only_the_pooler_suggests_scope_body(tmp_path, capsys):
    """A BERT base saved with its pooler and a fine-tune saved without it (sentence-transformers style): the
    error names --scope body, which merges the rest and copies the pooler from the base; a fine-tune lacking
    a body tensor keeps the general advice."""
    from transformers import BertModel
    from tiny import tiny_config

    torch.manual_seed(0)
    base = BertModel(tiny_config("bert")).eval()  # with pooler
    save_hf(base, tmp_path / "base", tiny_tokenizer(kind="encoder"))
    ft = save_hf(perturbed(base, scale=1e-2, seed=7), tmp_path / "ft")

    def no_pooler(sd):
        for name in [n for n in sd if n.startswith("pooler.")]:
            del sd[name]

    nopool = edited(ft, tmp_path / "nopool", no_pooler)
    out = tmp_path / "m"
    args = ["merge", "--base", str(tmp_path / "base"), "--method", "task_arithmetic", str(nopool), "--out", str(out),
            "--no-progress"]
    assert main(args) == 2 and nothing_written(out)
    one_line_error(capsys, "lacks tensor 'pooler.dense.", "(and 1 more)",
                   "merge with --scope body (it lacks only head/embedding tensors, which it leaves out)")
    assert main([*args, "--scope", "body"]) == 0
    rec = json.loads((out / "taskvec_merge.json").read_text())
    assert sorted(rec["copied_from_base"]) == ["embeddings.word_embeddings.weight", "pooler.dense.bias",
                                               "pooler.dense.weight"]

    def no_query(sd):
        del sd["encoder.layer.0.attention.self.query.weight"]

    noq = edited(ft, tmp_path / "noq", no_query)
    assert main(["merge", "--base", str(tmp_path / "base"), "--method", "task_arithmetic", str(noq), "--out",
                 str(tmp_path / "q"), "--no-progress"]) == 2
    assert "--scope body" not in one_line_error(capsys, "restrict --scope to the tensors it has")
