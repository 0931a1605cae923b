"""`taskvec check-merge`: audit a merged model against its base and the fine-tunes it claims to merge."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from ..outputs import OUTPUT_KINDS

    p = subparsers.add_parser(
        "check-merge", help="check that a merged model is the merge it claims to be (λ's, TIES/DARE signs, errors)",
        description="Fit θ_m − θ₀ ≈ Σ λ_t τ_t per tensor, per layer and globally; detect trimming, sign "
                    "election and DARE dropping; flag NaN/Inf, tensors that do not fit, tasks left out, a merge "
                    "built on another base, and missing/extra tensors. Writes DIR/check.json and "
                    "DIR/check_merge_layers.png/.pdf and prints one verdict line per finding. With --data (one "
                    "JSONL evaluation set per fine-tune) also the eNTK-predicted change of each task's outputs, "
                    "Σ_t λ_t J_A τ_t, next to the measured f_A(θ_m) − f_A(θ₀) (check.json 'retention', "
                    "DIR/check_merge_retention.png/.pdf).")
    p.add_argument("finetunes", nargs="*", metavar="FT",
                   help="the fine-tuned models the merge was made from; list them before --data")
    p.add_argument("--base", required=True, help="the base (pretrained) model")
    p.add_argument("--merged", required=True, help="the merged model to check")
    p.add_argument("--out", required=True, help="report folder (check.json + figure)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out report folder taskvec wrote (never an input or a model)")
    p.add_argument("--scope", default="all", help="tensors to check (preset or regex)")
    p.add_argument("--names", default=None, help="comma-separated task names, one per FT (default: the shortest "
                                                "path suffixes that tell them apart, e.g. movies/epoch-3)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any finding is an error")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g = p.add_argument_group("per-task retention (needs --data)")
    g.add_argument("--data", nargs="+", default=None, metavar="JSONL",
                   help="one evaluation set per fine-tune, same order ({text, label} or {prompt, target} per line; "
                        "it takes every path after it, so list the fine-tunes first); "
                        "τ_t and θ_m − θ₀ are taken over --scope (default all: the merged model itself)")
    g.add_argument("--output", default=None, choices=OUTPUT_KINDS,
                   help="output function f(x; θ) (required with --data)")
    g.add_argument("--label-words", default=None,
                   help="comma-separated label words for logits/margin on a causal LM (e.g. ' no, yes')")
    g.add_argument("--head", default=None, help="taskvec_head.safetensors (or its folder) for every task (default: "
                                               "the one beside each fine-tune, else beside the base)")
    g.add_argument("--max-length", type=int, default=None, help="reject longer examples (default: model context)")
    g.add_argument("--batch-size", type=int, default=32, help="examples per forward / J·τ pass (default 32)")
    p.set_defaults(func=run)


def _check_numbers(args) -> None:
    """Numeric options that must be positive, refused before any work."""
    from ..errors import TaskvecError

    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise TaskvecError(f"{flag} {value}: must be a positive integer (e.g. {flag} 32)")


def _retention_skipped(rep: dict) -> dict | None:
    """The finding that stands for per-task retention when the merged weights leave nothing to measure (NaN/Inf
    outputs, which 'undetermined' merges always have, or none moved), else None."""
    if rep["nonfinite"]:
        why = (f"the merged model holds NaN/Inf in {len(rep['nonfinite'])} tensor(s) (see 'nonfinite'), so its "
               "outputs are not numbers")
    elif rep["classification"] == "unchanged":
        why = "the merged model equals the base (see 'unchanged'), so no task's outputs move"
    else:
        return None
    return {"level": "error", "finding": "retention_skipped",
            "message": f"per-task retention not measured: {why}; redo the merge first"}


def run(args) -> int:
    from ..errors import TaskvecError
    from ..io import check_out_dir
    from ..checkpoints import warn_extra_tensors
    from ..merge.check import check_merge, write_check

    if not args.finetunes:
        raise TaskvecError("no fine-tuned models given" + (
            f": --data took every path after it ({', '.join(args.data)}); list the fine-tunes before --data"
            if args.data else "; list the fine-tunes the merge was made from (FT …)"))
    _check_numbers(args)
    inputs = [args.base, args.merged, *args.finetunes, *(args.data or [])]
    check_out_dir(args.out, overwrite=args.overwrite, inputs=inputs)  # before the long tensor pass, not after it
    from ..merge.retention_data import task_names

    names = task_names(args.finetunes, args.names.split(",") if args.names else None)

    if args.data is not None and args.output is None:
        raise TaskvecError("--data needs --output (regression, logits, margin, logprob or logprob-mean)")
    if args.data is not None and len(args.data) != len(args.finetunes):
        raise TaskvecError(f"--data gives {len(args.data)} JSONL file(s) but there are {len(args.finetunes)} "
                           "fine-tunes; give one evaluation set per fine-tune, in the same order")
    if args.data is None and (args.output or args.head or args.label_words or args.max_length):
        raise TaskvecError("--output/--head/--label-words/--max-length only apply with --data (one JSONL per "
                           "fine-tune)")
    if args.data is not None:
        from ..merge.retention_data import read_task_data, retention_outputs

        read_task_data(args.data, args.output)  # bad JSONL or output options fail before the (long) tensor check
        outputs = retention_outputs(args.base, args.finetunes, output=args.output, head=args.head,
                                    label_words=args.label_words.split(",") if args.label_words else None,
                                    max_length=args.max_length)
    rep = check_merge(args.base, args.merged, args.finetunes, scope=args.scope, progress=not args.no_progress,
                      names=names)
    skipped = _retention_skipped(rep) if args.data is not None else None
    if skipped:  # report the weights, skip the rest
        rep["findings"] = rep["findings"] + [skipped]
    elif args.data is not None:
        from ..merge.retention_data import retention_figure, retention_from_paths, verdicts

        rep["retention"] = retention_from_paths(
            args.base, args.merged, args.finetunes, args.data, rep["lambda_global"], output=args.output,
            scope=args.scope, batch_size=args.batch_size, progress=not args.no_progress, names=names,
            outputs=outputs)
        rep["findings"] = rep["findings"] + verdicts(rep["retention"])
    path = write_check(rep, args.out,
                       extra=(lambda d: retention_figure(rep["retention"], d)) if "retention" in rep else None,
                       overwrite=args.overwrite, inputs=inputs)
    warn_extra_tensors(rep["finetune_extra_tensors"], "not checked", "check.json under finetune_extra_tensors")
    lam = rep["lambda_global"]
    lam_txt = "λ not determined" if lam is None else f"λ = [{', '.join(_lambda_text(x, lam) for x in lam)}]"
    print(f"{rep['classification']}: {lam_txt}  ({rep['n_tensors_checked']} tensors; report {path})")
    for f in rep["findings"]:
        print(f"  [{f['level']}] {f['finding']}: {f['message']}")
    errors = [f for f in rep["findings"] if f["level"] == "error"]
    return 1 if (args.strict and errors) else 0


def _lambda_text(x: float, lam) -> str:
    """A fitted λ to 6 digits; one that is rounding noise next to the largest (|λ| < 1e-9·max|λ|) prints 0."""
    big = max((abs(v) for v in lam), default=0.0)
    return "0" if abs(x) < 1e-9 * big else f"{x:.6g}"
