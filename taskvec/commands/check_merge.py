"""`taskvec check-merge`: audit a merged model against its base and the fine-tunes it claims to merge."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check-merge", help="check that a merged model is the merge it claims to be (λ's, TIES/DARE signs, errors)",
        description="Fit θ_m − θ₀ ≈ Σ λ_t τ_t per tensor, per layer and globally; detect trimming, sign "
                    "election and DARE dropping; flag NaN/Inf, tensors that do not fit, tasks left out, a merge "
                    "built on another base, and missing/extra tensors. Writes DIR/check.json and "
                    "DIR/check_merge_layers.png/.pdf and prints one verdict line per finding.")
    p.add_argument("finetunes", nargs="+", metavar="FT", help="the fine-tuned models the merge was made from")
    p.add_argument("--base", required=True, help="the base (pretrained) model")
    p.add_argument("--merged", required=True, help="the merged model to check")
    p.add_argument("--out", required=True, help="report folder (check.json + figure)")
    p.add_argument("--scope", default="all", help="tensors to check (preset or regex)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any finding is an error")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..merge.check import check_merge, write_check

    rep = check_merge(args.base, args.merged, args.finetunes, scope=args.scope, progress=not args.no_progress)
    path = write_check(rep, args.out)
    print(f"{rep['classification']}: λ = [{', '.join(f'{x:.6g}' for x in rep['lambda_global'])}]  "
          f"({rep['n_tensors_checked']} tensors; report {path})")
    for f in rep["findings"]:
        print(f"  [{f['level']}] {f['finding']}: {f['message']}")
    errors = [f for f in rep["findings"] if f["level"] == "error"]
    return 1 if (args.strict and errors) else 0
