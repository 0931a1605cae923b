"""`taskvec ntk MODEL --data FILE.jsonl --output KIND --out DIR`: the pretrained model's eNTK on a probe set."""

from __future__ import annotations

from pathlib import Path

DTYPES = {"float32": "float32", "float64": "float64"}


def add_model_arguments(p) -> None:
    """Arguments shared by `taskvec ntk` and `taskvec project` (model, data, output function, kernel)."""
    from ..ntk import STRATEGIES
    from ..outputs import OUTPUT_KINDS

    p.add_argument("model", help="pretrained model: Hugging Face folder, .gguf file or hub id")
    p.add_argument("--data", required=True, help="probe set, JSONL: {prompt, target} or {text, label} per line")
    p.add_argument("--output", required=True, choices=OUTPUT_KINDS, help="output function f(x; θ)")
    p.add_argument("--scope", default="body", help="parameter scope: preset (body, attention, qkv, mlp, embeddings, "
                                                   "norms, all), 'a+b', or a regex (default: body)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES, help="kernel strategy (default: from --memory-gb)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory budget (default: half the free RAM)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    p.add_argument("--kind", default="auto", choices=["auto", "causal-lm", "encoder"], help="model kind (default: auto)")
    p.add_argument("--head", default=None, help="taskvec_head.safetensors (or its folder) for regression/logits "
                                               "on an encoder (default: the one beside MODEL)")
    p.add_argument("--label-words", default=None, help="comma-separated label words for logits/margin on a causal LM")
    p.add_argument("--max-length", type=int, default=None, help="reject longer examples (default: model context)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples of --data")
    p.add_argument("--sketch-dim", type=int, default=None, help="sketch dimension k (strategy sketch)")
    p.add_argument("--sketch", default="countsketch", choices=["countsketch", "gaussian"], help="sketch kind")
    p.add_argument("--top-k", type=int, default=None, help="eigenpairs to keep (required for lanczos)")
    p.add_argument("--mode", default="trace", choices=["trace", "block"],
                   help="multi-output kernel: trace (n×n) or block (nm×nm) (default trace)")
    p.add_argument("--gradients", default="auto", choices=["auto", "hooks", "vmap"],
                   help="per-example gradients: batched hooks where they cover the model (checked on the first "
                        "block), else vmap(grad) (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for sketches and random controls (default 0)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the kernel cache")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ntk", help="empirical NTK K = JJᵀ of the pretrained model on a probe set",
        description="Computes K = J Jᵀ (float64, unnormalised) for the output function f on the probe set, with "
                    "one of four strategies chosen from the memory budget, and the eigendecomposition of K/n. "
                    "Writes DIR/kernel.npy, eigenvalues.npy (of K/n, descending), eigenvectors.npy and ntk.json "
                    "(settings, timings, peak memory, strategy, sketch error if any).")
    add_model_arguments(p)
    p.add_argument("--directions", type=int, default=0, metavar="K",
                   help="also write the top-K parameter-space eigendirections v_i = Jᵀu_i/sqrt(nμ̂_i) to "
                        "DIR/directions.safetensors (tensor name → [K, *shape]; K·p numbers)")
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Refuse out-of-range numeric options before any work (shared by `ntk` and `project`)."""
    from ..errors import TaskvecError

    for flag, value, low in (("--limit", args.limit, 1), ("--top-k", args.top_k, 1),
                             ("--max-length", args.max_length, 1), ("--sketch-dim", args.sketch_dim, 1),
                             ("--directions", getattr(args, "directions", None), 0)):
        if value is not None and value < low:
            raise TaskvecError(f"{flag} must be ≥ {low} (got {value})")
    if args.memory_gb is not None and not args.memory_gb > 0:
        raise TaskvecError(f"--memory-gb must be a positive number of GB (got {args.memory_gb})")


def load_setup(args):
    """(model, output function, examples, description) from parsed arguments."""
    import torch

    from ..io import sha256_file
    from ..jsonl import read_jsonl
    from ..models import load_model, load_tokenizer
    from ..outputs import LinearHead, make_output, read_head_beside

    examples = read_jsonl(args.data, limit=args.limit)
    dtype = getattr(torch, DTYPES[args.dtype])
    model = load_model(args.model, kind=args.kind, dtype=dtype, device=args.device)
    tok = load_tokenizer(args.model)
    head = LinearHead.load(args.head) if args.head else read_head_beside(args.model)
    words = [w for w in args.label_words.split(",")] if args.label_words else None
    output = make_output(args.output, model, tok, head=head, label_words=words, max_length=args.max_length,
                         source=args.data)
    desc = {"model": str(args.model), "data": str(args.data), "data_sha256": sha256_file(args.data),
            "n_examples_read": len(examples), "dtype": args.dtype, "device": args.device,
            "output": args.output, "scope": args.scope, "mode": args.mode}
    return model, output, examples, desc


def kernel_from_args(args, model, output, examples):
    from ..ntk import compute_kernel

    return compute_kernel(model, output, examples, scope=args.scope, strategy=args.strategy,
                          memory_gb=args.memory_gb, sketch_dim=args.sketch_dim, sketch=args.sketch, seed=args.seed,
                          top_k=args.top_k, mode=args.mode, cache=not args.no_cache, progress=not args.no_progress,
                          gradients=getattr(args, "gradients", "auto"))


def run(args) -> int:
    from ..io import atomic_dir, check_out_dir

    check_args(args)
    check_out_dir(args.out, overwrite=args.overwrite, inputs=[args.model, args.data])  # fail before the work, not after it

    model, output, examples, desc = load_setup(args)
    result = kernel_from_args(args, model, output, examples)
    result.info["inputs"] = desc
    directions = None
    if args.directions:
        from ..ntk import eigendirections

        directions = eigendirections(model, output, examples, result, args.directions, scope=args.scope)
    with atomic_dir(Path(args.out), overwrite=args.overwrite, inputs=[args.model, args.data]) as tmp:
        result.save(tmp)
        if directions is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().cpu() for k, v in directions.items()}, str(tmp / "directions.safetensors"),
                      metadata={"format": "taskvec-eigendirections", "k": str(args.directions)})
    info = result.info
    top = ", ".join(f"{v:.4g}" for v in result.eigenvalues[:5])
    print(f"eNTK: n={info['n']} p={info['n_params']:,} strategy={info['strategy']} "
          f"gradients={info.get('per_example_gradients')} "
          f"time={info['seconds']['total']:.1f}s peak RSS={info['peak_rss_gb']:.2f} GB")
    print(f"top eigenvalues of K/n: {top}")
    if "sketch_rel_error_on_check" in info:
        print(f"sketch error on the within-block entries of {info['check_rows']} rows: {info['sketch_rel_error_on_check']:.3g} "
              f"(bound at δ=0.05: {info['sketch_rel_bound_on_check_delta_0.05']:.3g})")
    print(f"written: {args.out}")
    return 0
