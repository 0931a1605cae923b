"""TaskVector extraction, arithmetic, persistence and apply_to against fully loaded models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints_zoo import make_collection, make_lora, state
from taskvec.checkpoints import canonical_name, open_checkpoint
from taskvec.errors import TaskvecError
from taskvec.scope import resolve_scope
from taskvec.vectors import TaskVector
from tiny import ARCHS, save_hf, tiny_model




@pytest.fixture(scope="module", params=ARCHS)
def coll(request, tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp(request.param), request.param, n_ft=2)


def _direct(base_sd, ft_sd, names, dtype=torch.float32):
    b = {canonical_name(k): v for k, v in base_sd.items()}
    f = {canonical_name(k): v for k, v in ft_sd.items()}
    return {n: f[canonical_name(n)].to(dtype) - b[canonical_name(n)].to(dtype) for n in names}


def _close(tv, ref, rel=1e-6):
    assert set(tv.keys()) == set(ref)
    for k, v in ref.items():
        assert tv[k].shape == v.shape
        err = float((tv[k].double() - v.double()).norm())
        assert err <= rel * max(float(v.double().norm()), 1e-30), k


@pytest.mark.parametrize("fmt", ["ft", "ft0_bf16_sharded", "ft0_bin", "ft0_pt"])
def test_extraction_matches_full_load(coll, fmt):
    src = coll["ft"][0] if fmt == "ft" else coll[fmt]
    ft_sd = coll["ft0_bf16_sd"] if "bf16" in fmt else coll["ft_sd"][0]
    tv = TaskVector.from_checkpoints(coll["base"], src, scope="body", progress=False)
    names = resolve_scope([k for k in open_checkpoint(coll["base"]).keys()], "body")
    _close(tv, _direct(coll["base_sd"], ft_sd, names))
    tv64 = TaskVector.from_checkpoints(coll["base"], src, scope="attention", dtype=torch.float64, progress=False)
    assert all(v.dtype == torch.float64 for v in tv64.values())
    _close(tv64, _direct(coll["base_sd"], ft_sd, tv64.keys(), torch.float64), rel=1e-15)
    assert tv.meta["out_of_scope"] and tv.meta["alignment"]["n_pairs"] >= len(tv)


def test_arithmetic_geometry_and_persistence(coll, tmp_path):
    a = TaskVector.from_checkpoints(coll["base"], coll["ft"][0], progress=False)
    b = TaskVector.from_checkpoints(coll["base"], coll["ft"][1], progress=False)
    fa = torch.cat([a[k].reshape(-1) for k in a]).double()
    fb = torch.cat([b[k].reshape(-1) for k in a]).double()
    assert a.dot(b) == pytest.approx(float(fa @ fb), rel=1e-12)
    assert a.norm() == pytest.approx(float(fa.norm()), rel=1e-12)
    assert a.cosine(b) == pytest.approx(float(fa @ fb / fa.norm() / fb.norm()), rel=1e-12)
    c = 2 * a - b * 0.5 + (-a) / 4
    for k in a:
        assert torch.allclose(c[k], 2 * a[k] - 0.5 * b[k] - a[k] / 4, atol=1e-7)
    assert sum([a, b])[next(iter(a))].equal(a[next(iter(a))] + b[next(iter(a))])
    path = a.save(tmp_path / "tau.safetensors")
    back = TaskVector.load(path)
    assert back.keys() == a.keys() and all(torch.equal(back[k], a[k]) for k in a)
    assert back.meta["base"] == str(coll["base"])


def test_apply_to_writes_a_loadable_model(coll, tmp_path):
    model_cls = type(coll["base_model"])
    tv = TaskVector.from_checkpoints(coll["base"], coll["ft"][0], scope="all", progress=False)
    out = tv.apply_to(coll["base"], tmp_path / "applied", alpha=1.0, progress=False)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    loaded = state(model_cls.from_pretrained(out))
    ref = coll["ft_sd"][0]
    for k, v in ref.items():
        if v.is_floating_point():
            assert torch.allclose(loaded[k], v, atol=1e-6), k
    half = tv.apply_to(coll["base"], tmp_path / "half", alpha=0.5, progress=False)
    tv_half = TaskVector.from_checkpoints(coll["base"], half, scope="all", progress=False)
    for k in tv:
        assert torch.allclose(tv_half[k], 0.5 * tv[k], atol=1e-6)
    with pytest.raises(TaskvecError, match="not empty"):
        tv.apply_to(coll["base"], tmp_path / "half")
    # --overwrite replaces a model taskvec built (its record says so), never one it did not, nor the base
    again = tv.apply_to(coll["base"], tmp_path / "half", alpha=1.0, overwrite=True, progress=False)
    assert torch.allclose(TaskVector.from_checkpoints(coll["base"], again, scope="all", progress=False)[k], tv[k],
                          atol=1e-6)
    with pytest.raises(TaskvecError, match="holds a model checkpoint"):
        tv.apply_to(coll["base"], coll["ft"][0], overwrite=True, progress=False)
    with pytest.raises(TaskvecError, match="is \\(or contains\\) the input"):
        tv.apply_to(coll["base"], coll["base"], overwrite=True, progress=False)


def test_apply_to_keeps_shards_and_dtype(tmp_path):
    base = tiny_model("llama").to(torch.bfloat16)
    save_hf(base, tmp_path / "base", max_shard_size="20KB")
    tv = TaskVector({"model.layers.0.mlp.up_proj.weight": torch.ones(64, 32)})
    out = tv.apply_to(tmp_path / "base", tmp_path / "out", alpha=0.25, progress=False)
    ck = open_checkpoint(out)
    assert ck.format == "safetensors-sharded" and ck.dtype("model.norm.weight") == torch.bfloat16
    ref = base.state_dict()["model.layers.0.mlp.up_proj.weight"].float() + 0.25
    assert torch.equal(ck.get("model.layers.0.mlp.up_proj.weight"), ref.to(torch.bfloat16).float())
    assert torch.equal(ck.get("model.norm.weight", None), base.state_dict()["model.norm.weight"])


def test_lora_task_vector(tmp_path):
    base = tiny_model("gpt2")
    save_hf(base, tmp_path / "base")
    deltas, merged = make_lora(base, tmp_path / "lora", "gpt2")
    tv = TaskVector.from_checkpoints(tmp_path / "base", tmp_path / "lora", scope="all", progress=False)
    _close(tv, deltas)
    # applying the LoRA τ reproduces peft's merge
    out = tv.apply_to(tmp_path / "base", tmp_path / "merged", progress=False)
    ck = open_checkpoint(out)
    for k, v in state(merged).items():
        if k in ck:
            assert torch.allclose(ck.get(k), v, atol=1e-6), k
    with pytest.raises(TaskvecError, match="none of the tensors the LoRA adapter adapts"):
        TaskVector.from_checkpoints(tmp_path / "base", tmp_path / "lora", scope="norms", progress=False)


def test_bad_inputs(tmp_path):
    base = tiny_model("gpt2")
    save_hf(base, tmp_path / "base")
    sd = state(base)
    sd["transformer.h.0.mlp.c_proj.weight"][3, 4] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(TaskvecError, match=r"nan\.pt.*transformer\.h\.0\.mlp\.c_proj\.weight.*NaN/Inf"):
        TaskVector.from_checkpoints(tmp_path / "base", tmp_path / "nan.pt", progress=False)
    sd = state(base)
    sd["transformer.h.1.ln_2.bias"] = torch.zeros(40)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(TaskvecError, match=r"transformer\.h\.1\.ln_2\.bias.*\(40,\)"):
        TaskVector.from_checkpoints(tmp_path / "base", tmp_path / "shape.pt", progress=False)
    # … unless the tensor is out of scope
    tv = TaskVector.from_checkpoints(tmp_path / "base", tmp_path / "shape.pt", scope="attention", progress=False)
    assert len(tv) == 8
    save_hf(tiny_model("bert"), tmp_path / "bert")
    with pytest.raises(TaskvecError, match="bert model but the base"):
        TaskVector.from_checkpoints(tmp_path / "base", tmp_path / "bert", progress=False)
    with pytest.raises(TaskvecError, match="different bases"):
        TaskVector({"a": torch.ones(2)}) + TaskVector({"a": torch.ones(3)})


def test_vectors_command_does_not_import_transformers(coll, tmp_path):
    """`taskvec vectors` reads tensors only: it must not pay the transformers import (≈ 1 s per run)."""
    import json
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom taskvec.cli import main\n"
            f"rc = main(['vectors', {str(coll['base'])!r}, {str(coll['ft'][0])!r}, {str(coll['ft'][1])!r}, "
            f"'--basic', '--no-figures', '--no-progress', '--out', {str(tmp_path / 'v')!r}])\n"
            "print('LOADED', 'transformers' in sys.modules, rc)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "LOADED False 0" in out
    assert json.loads((tmp_path / "v" / "vectors.json").read_text())["tasks"] == ["ft0", "ft1"]


def test_vectors_command_top_k_given_twice_counts_once(tmp_path, capsys):
    import json

    from taskvec.cli import main
    from tiny import perturbed

    base = tiny_model("gpt2")
    save_hf(base, tmp_path / "base")
    save_hf(perturbed(base, seed=1), tmp_path / "ft")
    rc = main(["vectors", str(tmp_path / "base"), str(tmp_path / "ft"), "--top-k", "1,10,1.0", "--no-figures",
               "--no-progress", "--spectra-max-dim", "0", "--out", str(tmp_path / "v")])
    out = capsys.readouterr().out
    assert rc == 0
    assert json.loads((tmp_path / "v" / "vectors.json").read_text())["config"]["top_k_percent"] == [1.0, 10.0]
    header = next(line for line in out.splitlines() if line.startswith("task"))
    row = next(line for line in out.splitlines() if line.startswith("ft "))
    assert header.split()[-2:] == ["top1%", "top10%"] and header.count("top1%") == 1
    assert len(row.split()) == len(header.split())
    from taskvec.vector_stats import collection_stats  # the API counts a repeated percentage once too

    st = collection_stats(tmp_path / "base", [tmp_path / "ft"], top_k_percent=(1, 1.0, 10), spectra_max_dim=0,
                          progress=False).to_dict()
    assert st["config"]["top_k_percent"] == [1.0, 10.0] and list(st["global"]["ft"]["top_mass"]) == ["1", "10"]


def test_cli_dtype_float64_and_its_alias(tmp_path, capsys):
    """`--dtype float64` (and the older `--float64`) compute τ in float64; the norms agree with float32's to
    float32 rounding and with a direct float64 subtraction to 1e-12."""
    import json

    from taskvec.cli import main
    from tiny import perturbed

    base = tiny_model("gpt2")
    ft = perturbed(base, seed=2)
    save_hf(base, tmp_path / "base")
    save_hf(ft, tmp_path / "ft")
    want = float(sum(((p.detach().double() - q.detach().double()) ** 2).sum()
                         for p, q in zip(ft.transformer.h.parameters(), base.transformer.h.parameters()))) ** 0.5
    got = {}
    for flags in (["--dtype", "float64"], ["--float64"], []):
        out = tmp_path / ("v" + "".join(flags))
        assert main(["vectors", str(tmp_path / "base"), str(tmp_path / "ft"), "--scope", r"^(transformer\.)?h\.",
                     "--basic", "--no-figures", "--no-progress", "--out", str(out), *flags]) == 0
        data = json.loads((out / "vectors.json").read_text())
        got[data["config"]["dtype"], bool(flags)] = data["global"]["ft"]["norm"]
    assert set(got) == {("float64", True), ("float32", False)}
    assert got["float64", True] == pytest.approx(want, rel=1e-12)
    assert got["float32", False] == pytest.approx(want, rel=1e-6)


def test_command_line_mistakes_are_one_line(capsys):
    """An unknown choice or a missing argument is one line naming the option and pointing at --help (argparse
    alone prints the usage block, up to a dozen lines, above it)."""
    from taskvec.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["merge", "--base", "b", "--method", "bogus", "--out", "o", "ft"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("taskvec merge: error: argument --method: invalid choice: 'bogus'")
    assert err.strip().endswith("(see 'taskvec merge --help')")
    with pytest.raises(SystemExit):
        main(["vectors"])
    assert capsys.readouterr().err.strip() == ("taskvec vectors: error: the following arguments are required: "
                                               "base, FT, --out (see 'taskvec vectors --help')")


def test_taskvector_arithmetic_with_numpy_scalars_dtypes_and_misuse(coll, tmp_path):
    """An α sweep with numpy scalars works (numpy must not turn τ into an array of its keys); mixed dtypes
    promote (a bf16 + fp32 sum keeps the fp32 part); misuse is a clear error, never a raw one."""
    import numpy as np

    tv = TaskVector.from_checkpoints(coll["base"], coll["ft"][0], progress=False)
    k = tv.keys()[0]
    for a in np.linspace(0, 1, 3):
        assert torch.equal((a * tv)[k], tv[k] * float(a)) and torch.equal((tv * a)[k], tv[k] * float(a))
    assert torch.equal((np.float32(2) * tv)[k], 2 * tv[k])
    for a in torch.linspace(0, 1, 3):  # 0-d tensors and arrays are scalars too
        assert torch.equal((a * tv)[k], tv[k] * float(a)) and torch.equal((np.array(a.item()) * tv)[k], (a * tv)[k])
    with pytest.raises(TaskvecError, match="overflows tensor"):
        tv * 1e300
    with pytest.raises(TaskvecError, match="cannot divide a task vector by"):
        tv / 1e-320
    with pytest.raises(TypeError):
        tv * torch.ones(2)
    assert torch.equal((tv - 0)[k], tv[k]) and torch.equal((0 - tv)[k], -tv[k]) and torch.equal(sum([tv])[k], tv[k])
    lo = TaskVector({"x": torch.ones(2, dtype=torch.bfloat16)})
    hi = TaskVector({"x": torch.full((2,), 1e-3)})
    for s in (lo + hi, hi + lo):
        assert s["x"].dtype == torch.float32 and torch.allclose(s["x"], torch.full((2,), 1.001))
    with pytest.raises(TypeError):
        tv * "2"
    with pytest.raises(TypeError):
        tv * True
    with pytest.raises(TypeError):
        tv + 1
    with pytest.raises(TaskvecError, match="finite"):
        tv * float("nan")
    with pytest.raises(TaskvecError, match="divide a task vector by 0"):
        tv / 0
    with pytest.raises(TypeError, match="dot needs another TaskVector, not int"):
        tv.dot(3)
    with pytest.raises(TypeError, match="cosine needs another TaskVector, not Tensor"):
        tv.cosine(torch.ones(3))
    with pytest.raises(TaskvecError, match="'x' is a list, not a torch.Tensor"):
        TaskVector({"x": [1.0, 2.0]})
    with pytest.raises(TaskvecError, match="'x' has dtype torch.int64"):
        TaskVector({"x": torch.arange(3)})
    with pytest.raises(TaskvecError, match="is a folder; give a file name"):
        tv.save(tmp_path)
    # a sum keeps the base it was extracted from (apply_to's record names it)
    both = tv + TaskVector.from_checkpoints(coll["base"], coll["ft"][1], progress=False)
    assert both.meta["base"] == tv.meta["base"] and both.meta["base_fingerprint"] == tv.meta["base_fingerprint"]


def test_load_refuses_model_weights_and_apply_to_refuses_non_finite_or_warns_on_another_base(coll, tmp_path):
    """Model weights are θ, not τ: TaskVector.load refuses them. apply_to with a non-finite α or a τ that
    overflows writes nothing; applying τ to a model other than its base is a warning."""
    import warnings as w

    from taskvec.errors import TaskvecWarning

    tv = TaskVector.from_checkpoints(coll["base"], coll["ft"][0], progress=False)
    weights = next(Path(coll["base"]).glob("*.safetensors"))
    with pytest.raises(TaskvecError, match="not a task vector written by TaskVector.save"):
        TaskVector.load(weights)
    assert TaskVector.load(tv.save(tmp_path / "tau.safetensors")).keys() == tv.keys()
    for alpha in (float("nan"), float("inf"), "1"):
        with pytest.raises(TaskvecError, match="give a finite number"):
            tv.apply_to(coll["base"], tmp_path / "bad", alpha=alpha, progress=False)
    with pytest.raises(TaskvecError, match="holds NaN/Inf"):
        (tv * 1e38).apply_to(coll["base"], tmp_path / "bad", alpha=1e3, progress=False)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial-*"))
    with pytest.warns(TaskvecWarning, match="is not the base this task vector was extracted from"):
        tv.apply_to(coll["ft"][1], tmp_path / "other", progress=False)
    with w.catch_warnings():
        w.simplefilter("error", TaskvecWarning)
        tv.apply_to(coll["base"], tmp_path / "own", progress=False)
