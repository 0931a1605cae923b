"""`taskvec ntk` / `taskvec project` refuse bad input with one clear message (exit 2) instead of a traceback
or silently wrong numbers: mismatched --kernel folders, broken checkpoints, out-of-range options."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec.cli import main
from tiny import perturbed, save_hf, tiny_model, tiny_tokenizer

PAIRS = [{"prompt": "what is 3 plus 4 ?", "target": " 7"},
         {"prompt": "the", "target": " movie was wonderful"},
         {"prompt": "calculate 6 times 7 .", "target": " 42"},
         {"prompt": "worst", "target": " purchase ever"}]
TENSOR = "transformer.h.0.mlp.c_fc.weight"
RUN = ["--no-progress", "--dtype", "float64"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base, a fine-tune, an unrelated model, broken copies of the base, probe sets and a saved kernel."""
    d = tmp_path_factory.mktemp("badinput")
    base, tok = tiny_model("gpt2", seed=0), tiny_tokenizer()
    save_hf(base, d / "base", tok)
    save_hf(perturbed(base, 1e-3, seed=1), d / "ft", tok)
    save_hf(tiny_model("gpt2", seed=5), d / "other", tok)
    for name in ("missing", "nan", "trunc"):
        shutil.copytree(d / "base", d / name)
    save_hf(base, d / "notok")  # weights without tokenizer files
    sd = load_file(str(d / "base" / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k != TENSOR}, str(d / "missing" / "model.safetensors"),
              metadata={"format": "pt"})
    bad = dict(sd)
    bad[TENSOR] = sd[TENSOR].clone()
    bad[TENSOR][0, 0] = float("nan")
    save_file(bad, str(d / "nan" / "model.safetensors"), metadata={"format": "pt"})
    raw = (d / "base" / "model.safetensors").read_bytes()
    (d / "trunc" / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    _jsonl(d / "p.jsonl", PAIRS)
    _jsonl(d / "p_rev.jsonl", PAIRS[::-1])
    _jsonl(d / "text.jsonl", [{"text": p["prompt"], "label": i % 2} for i, p in enumerate(PAIRS)])
    (d / "folder").mkdir()
    rc = main(["ntk", str(d / "base"), "--data", str(d / "p.jsonl"), "--output", "logprob", "--out", str(d / "K"),
               "--no-cache"] + RUN)
    assert rc == 0
    return d


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))


def _err(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def _project(files, tmp_path, *extra, model="base", data="p.jsonl", output="logprob"):
    return ["project", str(files / model), str(files / "ft"), "--data", str(files / data), "--output", output,
            "--out", str(tmp_path / "proj"), "--kernel", str(files / "K"), "--controls", "0", "--no-figures",
            *RUN, *extra]


@pytest.mark.parametrize("change, expected", [
    ({"data": "p_rev.jsonl"}, "was computed on other probe examples than --data"),
    ({"model": "other"}, "was computed on other model weights than"),
    ({"output": "logprob-mean"}, "was computed with --output logprob, this run uses logprob-mean: recompute it"),
    ({"extra": ["--scope", "attention"]}, "was computed with --scope body, this run uses attention"),
    ({"extra": ["--max-length", "40"]}, "was computed with --max-length (effective) 64, this run uses 40"),
])
def test_project_refuses_a_kernel_computed_with_other_inputs(files, tmp_path, capsys, change, expected):
    extra = change.pop("extra", [])
    rc, err = _err(_project(files, tmp_path, *extra, **change), capsys)
    assert rc == 2 and expected in err and f"--kernel {files / 'K'}" in err
    assert not (tmp_path / "proj").exists()


def test_project_with_matching_kernel_reuses_it_and_notes_unrecorded_fields(files, tmp_path, capsys):
    rc = main(_project(files, tmp_path))
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "proj" / "projection.json").read_text())["kernel_unverified"] == []
    # an ntk.json without the examples hash and model digest: what could not be verified is said, not crashed on
    old = tmp_path / "old"
    shutil.copytree(files / "K", old)
    info = json.loads((old / "ntk.json").read_text())
    del info["examples"], info["model"]
    (old / "ntk.json").write_text(json.dumps(info))
    argv = _project(files, tmp_path, "--overwrite")
    argv[argv.index("--kernel") + 1] = str(old)
    rc, err = _err(argv, capsys)
    assert rc == 0 and "could not verify" in err and "the probe examples, the model weights" in err
    rep = json.loads((tmp_path / "proj" / "projection.json").read_text())
    assert rep["kernel_unverified"] == ["the probe examples", "the model weights"]


def test_project_refuses_a_zero_task_vector(files, tmp_path, capsys):
    rc, err = _err(["project", str(files / "base"), str(files / "base"), "--data", str(files / "p.jsonl"),
                    "--output", "logprob", "--out", str(tmp_path / "z"), "--no-progress"], capsys)
    assert rc == 2 and "the task vector τ is zero" in err and "the fine-tune equals the base" in err
    assert not (tmp_path / "z").exists()
    sd = load_file(str(files / "base" / "model.safetensors"))  # a fine-tune that moved only the word embeddings
    shutil.copytree(files / "base", tmp_path / "emb")
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"] + 0.1
    save_file(sd, str(tmp_path / "emb" / "model.safetensors"), metadata={"format": "pt"})
    rc, err = _err(["project", str(files / "base"), str(tmp_path / "emb"), "--data", str(files / "p.jsonl"),
                    "--output", "logprob", "--out", str(tmp_path / "z"), "--no-progress"], capsys)
    assert rc == 2 and "τ is zero" in err and "under --scope body" in err and "wider --scope" in err


@pytest.mark.parametrize("model, expected", [
    ("missing", f"lacks 1 weight(s) the model needs ('{TENSOR}')"),
    ("nan", f"tensor '{TENSOR}' contains 1 NaN/Inf values"),
    ("trunc", "model.safetensors: tensor"),
    ("notok", "notok: no tokenizer files in this model folder"),
])
def test_ntk_refuses_broken_checkpoints(files, tmp_path, capsys, model, expected):
    rc, err = _err(["ntk", str(files / model), "--data", str(files / "p.jsonl"), "--output", "logprob",
                    "--out", str(tmp_path / "o")] + RUN, capsys)
    assert rc == 2 and expected in err and "Traceback" not in err
    if model == "trunc":
        assert "truncated" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--directions", "-1"], "--directions must be ≥ 0 (got -1)"),
    (["--strategy", "lanczos", "--top-k", "0"], "--top-k must be ≥ 1 (got 0)"),
    (["--max-length", "-1"], "--max-length must be ≥ 1 (got -1)"),
    (["--max-length", "0"], "--max-length must be ≥ 1 (got 0)"),
    (["--device", "banana"], "unknown device 'banana'"),
    (["--directions", "99"], "99 eigendirections asked for, but the kernel has only"),
    (["--output", "margin", "--label-words", "the,zzzz"], "label word 'zzzz' is not in the tokenizer's vocabulary"),
])
def test_ntk_refuses_bad_options(files, tmp_path, capsys, extra, expected):
    argv = ["ntk", str(files / "base"), "--data", str(files / "p.jsonl"), "--out", str(tmp_path / "o")] + RUN
    if "--output" not in extra:
        argv += ["--output", "logprob"]
    rc, err = _err(argv + extra, capsys)
    assert rc == 2 and expected in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_ntk_device_cuda_without_cuda(files, tmp_path, capsys):
    rc, err = _err(["ntk", str(files / "base"), "--data", str(files / "p.jsonl"), "--output", "logprob",
                    "--out", str(tmp_path / "o"), "--device", "cuda"] + RUN, capsys)
    assert rc == 2 and "--device cuda" in err and "use --device cpu" in err


def test_project_refuses_negative_fd_eps(files, tmp_path, capsys):
    rc, err = _err(["project", str(files / "base"), str(files / "ft"), "--data", str(files / "p.jsonl"),
                    "--output", "logprob", "--out", str(tmp_path / "o"), "--fd-eps", "-1"] + RUN, capsys)
    assert rc == 2 and "--fd-eps must be > 0" in err


def test_data_errors_name_the_file(files, tmp_path, capsys):
    common = ["--output", "logprob", "--out", str(tmp_path / "o")] + RUN
    rc, err = _err(["ntk", str(files / "base"), "--data", str(files / "text.jsonl")] + common, capsys)
    assert rc == 2 and "text.jsonl:1: output 'logprob' needs 'prompt' and 'target' fields" in err
    rc, err = _err(["ntk", str(files / "base"), "--data", str(files / "folder")] + common, capsys)
    assert rc == 2 and "folder: is a folder" in err and ".jsonl file" in err and "not found" not in err


def test_non_finite_kernel_is_refused_before_the_eigendecomposition():
    """A model object with a NaN weight (not loaded from a file, so not checked on load) gives a NaN kernel."""
    from taskvec.errors import TaskvecError
    from taskvec.models import load_model
    from taskvec.ntk import compute_kernel
    from taskvec.outputs import make_output

    model = load_model(tiny_model("gpt2", seed=0), dtype=torch.float64)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    f = make_output("logprob", model, tiny_tokenizer())
    with pytest.raises(TaskvecError, match=r"the eNTK has \d+ NaN/Inf entries"):
        compute_kernel(model, f, PAIRS, cache=False, progress=False)
    # the same model without the NaN: a finite kernel
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 0.0
    assert np.isfinite(compute_kernel(model, f, PAIRS, cache=False, progress=False).K).all()
