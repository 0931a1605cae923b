"""`taskvec vectors BASE FT [FT …] --out DIR`: task-vector statistics of a checkpoint collection."""

from __future__ import annotations


def _percentages(text: str) -> list[float]:
    """Comma-separated numbers, each kept once in the order given (1,10,1 → [1, 10])."""
    return list(dict.fromkeys(float(x) for x in text.split(",") if x.strip()))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "vectors", help="norms, cosines, sign conflicts, sparsity and spectra of task vectors (streaming)",
        description="Read BASE and every FT one tensor at a time (folders, .safetensors, *.index.json, .bin/.pt, "
                    "PEFT LoRA adapters, .gguf, hub ids) and write DIR/vectors.json (schema: docs/vectors_schema.md) "
                    "with per-tensor, per-layer and global statistics of τ = FT − BASE, plus figures.")
    p.add_argument("base", help="the pretrained model θ₀")
    p.add_argument("fts", nargs="+", metavar="FT", help="fine-tuned checkpoints or LoRA adapters of BASE")
    p.add_argument("--names", help="comma-separated task names, one per FT (default: folder names)")
    p.add_argument("--scope", default="body",
                   help="preset (all, body, attention, qkv, mlp, embeddings, norms; join with +) or a regex "
                        "(default: body)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--top-k", default="1,10", help="top-k%% levels for mass and mask overlap (default 1,10)")
    p.add_argument("--spectra-max-dim", type=int, default=1024,
                   help="singular values of 2-D tensors whose smaller side is ≤ this (0: none; default 1024)")
    p.add_argument("--n-singular", type=int, default=8, help="top singular values stored per tensor (default 8)")
    p.add_argument("--basic", action="store_true",
                   help="norms, relative norms and cosines only (one pass; no top-k, sign, mask or spectral statistics)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="arithmetic dtype of τ (default float32; statistics accumulate in float64 either way)")
    p.add_argument("--float64", dest="dtype", action="store_const", const="float64",
                   help="same as --dtype float64")
    p.add_argument("--no-figures", action="store_true", help="write vectors.json only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--allow-network", action="store_true", help="allow downloading hub ids")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch

    from ..errors import TaskvecError
    from ..io import atomic_dir, check_out_dir, atomic_path, atomic_write_json

    inputs = [args.base, *args.fts]
    check_out_dir(args.out, overwrite=args.overwrite, inputs=inputs)  # fail before the work, not after it
    from ..vector_stats import collection_stats

    try:
        ks = _percentages(args.top_k)
    except ValueError:
        raise TaskvecError(f"--top-k {args.top_k!r}: give comma-separated percentages, e.g. 1,10") from None
    if args.spectra_max_dim < 0:
        raise TaskvecError(f"--spectra-max-dim {args.spectra_max_dim} must be ≥ 0 (0: no spectra)")
    if args.n_singular < 1:
        raise TaskvecError(f"--n-singular {args.n_singular} must be ≥ 1")
    stats = collection_stats(args.base, args.fts, args.names, scope=args.scope, top_k_percent=ks,
                             spectra_max_dim=args.spectra_max_dim, n_singular=args.n_singular,
                             dtype=getattr(torch, args.dtype), progress=not args.no_progress,
                             allow_network=args.allow_network, basic=args.basic)
    data = stats.to_dict()
    with atomic_dir(args.out, overwrite=args.overwrite, inputs=inputs) as tmp:
        atomic_write_json(tmp / "vectors.json", data)
        if stats.spectra and any(stats.spectra.values()):
            with atomic_path(tmp / "spectra.npz") as p:
                with open(p, "wb") as fh:
                    np.savez(fh, **{f"{t}/{k}": v for t, d in stats.spectra.items() for k, v in d.items()})
        if not args.no_figures:
            from ..vector_figures import save_vector_figures

            save_vector_figures(data, stats.spectra, tmp)
    _print_summary(data, args.out)
    return 0


def _print_summary(data: dict, out) -> None:
    from ..checkpoints import counted, warn_extra_tensors

    names = data["tasks"]
    sc = data["scope"]
    print(f"scope {data['config']['scope']}: {counted(sc['n_tensors'], 'tensor')}, {sc['n_params']:,} parameters "
          f"({counted(len(sc['out_of_scope']), 'tensor')} out of scope, {len(sc['skipped'])} skipped)")
    for n in names:
        warn_extra_tensors({n: data["alignment"][n].get("extra") or []}, "left out of τ",
                           f"vectors.json under alignment/{n}/extra")
        if not data["global"][n]["norm"]:
            print(f"  note: τ of {n} is zero over this scope (the fine-tune equals the base there); its top-k "
                  f"masses, cosines and sign statistics are undefined (null)")
    w = max(8, *(len(n) for n in names))
    print(f"{'task':<{w}}  {'‖τ‖':>10}  {'‖τ‖/‖θ₀‖':>10}  " + "  ".join(f"top{k:g}%" for k in data["config"]["top_k_percent"]))
    for n in names:
        g = data["global"][n]
        tops = "  ".join(f"{v:>6.3f}" for v in g["top_mass"].values())
        print(f"{n:<{w}}  {g['norm']:>10.4g}  {g['relative_norm']:>10.4g}  {tops}")
    if len(names) > 1:
        print("cosine:")
        for i, n in enumerate(names):
            print(f"  {n:<{w}} " + " ".join(f"{c:>6.3f}" if c is not None else "   nan" for c in data["cosine"][i]))
    print(f"wrote {out}/vectors.json")
