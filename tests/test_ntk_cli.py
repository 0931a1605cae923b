"""`taskvec ntk` and `taskvec project` end to end on tiny real models saved to disk, and bad input."""

import json
import re

import numpy as np
import pytest
import torch

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.jsonl import read_jsonl
from tiny import perturbed, save_hf, tiny_model, tiny_tokenizer

PAIRS = [{"prompt": "what is 3 plus 4 ?", "target": " 7"},
         {"prompt": "the", "target": " movie was wonderful"},
         {"prompt": "calculate 6 times 7 .", "target": " 42"},
         {"prompt": "i love this phone", "target": " , battery lasts forever"},
         {"prompt": "worst", "target": " purchase ever"},
         {"prompt": "the market rose", "target": " sharply after the news"}]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def causal(tmp_path):
    base = tiny_model("gpt2", seed=0)
    tok = tiny_tokenizer()
    save_hf(base, tmp_path / "base", tok)
    save_hf(perturbed(base, 1e-3, seed=1), tmp_path / "ft", tok)
    return tmp_path / "base", tmp_path / "ft", _jsonl(tmp_path / "probe.jsonl", PAIRS)


def test_ntk_command_writes_kernel_and_spectrum(causal, tmp_path, capsys):
    base, _, data = causal
    out = tmp_path / "k"
    rc = main(["ntk", str(base), "--data", str(data), "--output", "logprob", "--out", str(out), "--no-progress",
               "--dtype", "float64"])
    assert rc == 0, capsys.readouterr().err
    K = np.load(out / "kernel.npy")
    vals, vecs = np.load(out / "eigenvalues.npy"), np.load(out / "eigenvectors.npy")
    info = json.loads((out / "ntk.json").read_text())
    assert K.shape == (6, 6) and K.dtype == np.float64 and np.allclose(K, K.T)
    assert np.all(np.diff(vals) <= 0) and np.allclose(vecs @ np.diag(vals) @ vecs.T, K / 6, atol=1e-10 * vals[0])
    assert info["strategy"] == "exact" and info["n"] == 6 and "seconds" in info and info["inputs"]["data_sha256"]
    # the same kernel through the Python API
    from taskvec.models import load_model, load_tokenizer
    from taskvec.ntk import compute_kernel
    from taskvec.outputs import make_output

    model = load_model(base, dtype=torch.float64)
    res = compute_kernel(model, make_output("logprob", model, load_tokenizer(base)), read_jsonl(data),
                         progress=False, cache=False)
    assert np.allclose(res.K, K, rtol=1e-12)
    assert "strategy=exact gradients=hooks" in capsys.readouterr().out
    # --gradients vmap: the fallback path from the command line gives the same kernel
    rc = main(["ntk", str(base), "--data", str(data), "--output", "logprob", "--out", str(tmp_path / "v"),
               "--no-progress", "--dtype", "float64", "--gradients", "vmap", "--no-cache"])
    assert rc == 0 and json.loads((tmp_path / "v" / "ntk.json").read_text())["per_example_gradients"] == "vmap"
    assert np.allclose(np.load(tmp_path / "v" / "kernel.npy"), K, rtol=1e-10)


def test_ntk_command_sketch_and_lanczos(causal, tmp_path):
    base, _, data = causal
    assert main(["ntk", str(base), "--data", str(data), "--output", "logprob-mean", "--out", str(tmp_path / "s"),
                 "--strategy", "sketch", "--sketch-dim", "4096", "--no-progress"]) == 0
    info = json.loads((tmp_path / "s" / "ntk.json").read_text())
    assert info["sketch_rel_error_on_check"] <= info["sketch_rel_bound_on_check_delta_0.05"]
    assert main(["ntk", str(base), "--data", str(data), "--output", "logprob", "--out", str(tmp_path / "d"),
                 "--directions", "2", "--no-progress", "--dtype", "float64"]) == 0
    from safetensors.torch import load_file

    V = load_file(str(tmp_path / "d" / "directions.safetensors"))
    flat = torch.cat([v.reshape(2, -1) for v in V.values()], 1)
    assert torch.allclose(flat @ flat.T, torch.eye(2, dtype=torch.float64), atol=1e-10)
    assert main(["ntk", str(base), "--data", str(data), "--output", "logprob", "--out", str(tmp_path / "l"),
                 "--strategy", "lanczos", "--top-k", "2", "--no-progress"]) == 0
    assert not (tmp_path / "l" / "kernel.npy").exists() and np.load(tmp_path / "l" / "eigenvalues.npy").shape == (2,)


def test_project_command_finetune_and_task_vector_file(causal, tmp_path, capsys):
    base, ft, data = causal
    out = tmp_path / "p"
    rc = main(["project", str(base), str(ft), "--data", str(data), "--output", "logprob", "--out", str(out),
               "--no-progress", "--dtype", "float64", "--controls", "2"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "projection.json").read_text())
    assert rep["jvp_vs_finite_difference"]["relative_difference"] < 1e-5
    frac = rep["task"]["energy_fraction"]
    assert 0 < frac <= 1 and len(rep["random_controls"]) == 2
    assert (out / "projection.png").is_file() and (out / "projection.pdf").is_file()
    # E/‖τ‖² by hand: τ's component in the row space of J (J from the saved kernel's eigenpairs and J·τ)
    c = np.load(out / "coefficients.npy")
    assert np.sum(c ** 2) / rep["task"]["tau_sq_norm"] == pytest.approx(frac)
    from taskvec.vectors import TaskVector

    tv = TaskVector.from_checkpoints(base, ft, scope="body", progress=False)
    assert rep["task"]["tau_sq_norm"] == pytest.approx(tv.norm() ** 2, rel=1e-5)
    tv.save(tmp_path / "tau.safetensors")
    out2 = tmp_path / "p2"
    assert main(["project", str(base), str(tmp_path / "tau.safetensors"), "--data", str(data), "--output", "logprob",
                 "--out", str(out2), "--no-progress", "--dtype", "float64", "--kernel", str(out),
                 "--controls", "0", "--no-figures"]) == 0
    rep2 = json.loads((out2 / "projection.json").read_text())
    assert rep2["task"]["energy_fraction"] == pytest.approx(frac, rel=1e-5)


def _err(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_bad_input_errors(causal, tmp_path, capsys):
    base, _, data = causal
    common = ["--output", "logprob", "--no-progress", "--out"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(PAIRS[1]) + "\n")
    rc, err = _err(["ntk", str(base), "--data", str(bad)] + common + [str(tmp_path / "o1")], capsys)
    assert rc == 2 and "bad.jsonl:2: empty line" in err
    from taskvec.jsonl import read_jsonl

    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + "\n\n  \n")  # blank lines at the end
    assert read_jsonl(bad) == PAIRS[:2]
    for label in ("true", "NaN", "Infinity"):  # not a regression target nor a class
        bad.write_text('{"text": "ok", "label": 1.5}\n{"text": "x", "label": %s}\n' % label)
        with pytest.raises(TaskvecError, match=r"bad.jsonl:2: label .* is not usable"):
            read_jsonl(bad)
    bad.write_text(json.dumps(PAIRS[0]) + "\n{\"prompt\": \"x\", \"target\n")
    rc, err = _err(["ntk", str(base), "--data", str(bad)] + common + [str(tmp_path / "o2")], capsys)
    assert rc == 2 and "bad.jsonl:2: malformed JSON" in err
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    rc, err = _err(["ntk", str(base), "--data", str(bad)] + common + [str(tmp_path / "o3")], capsys)
    assert rc == 2 and "bad.jsonl:1: needs fields" in err
    _jsonl(bad, [PAIRS[0], {"prompt": "the movie", "target": "   "}])
    rc, err = _err(["ntk", str(base), "--data", str(bad)] + common + [str(tmp_path / "o4")], capsys)
    assert rc == 2 and "bad.jsonl:2: target '   ' tokenises to nothing" in err
    _jsonl(bad, [{"prompt": "the " * 80, "target": " 7"}])
    rc, err = _err(["ntk", str(base), "--data", str(bad)] + common + [str(tmp_path / "o5")], capsys)
    assert rc == 2 and "exceed the model's context length (64)" in err
    rc, err = _err(["ntk", str(base), "--data", str(data), "--scope", "nothing_matches_this"] + common
                   + [str(tmp_path / "o6")], capsys)
    assert rc == 2 and "selects none" in err
    rc, err = _err(["ntk", str(base), "--data", str(data), "--memory-gb", "0.00001"] + common
                   + [str(tmp_path / "o7")], capsys)
    assert rc == 2 and re.search(r"memory budget 10\.5 kB is too small for any strategy: the model takes \d+\.\d kB "
                                 r"and one example's gradient pass about \d+\.\d [kM]B;", err)  # not "0.00 GB"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = _err(["ntk", str(base), "--data", str(empty)] + common + [str(tmp_path / "o8")], capsys)
    assert rc == 2 and "no examples" in err
    rc, err = _err(["project", str(base), str(tmp_path / "nope.safetensors"), "--data", str(data)] + common
                   + [str(tmp_path / "o9")], capsys)
    assert rc == 2 and "nope.safetensors" in err
    # nothing half-written
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 10))
