"""`taskvec finetune CONFIG --out DIR`: build (or resume) a checkpoint collection."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from ..collection import PRESETS

    p = subparsers.add_parser(
        "finetune", help="fine-tune a base model on each task of a collection config (resumable)",
        description="Fine-tune the base of a collection config (TOML/YAML; see taskvec.collection) on every "
                    "task, saving a checkpoint after every epoch and at fractions of the first, training and "
                    "validation curves and the exact optimiser settings. Rerunning resumes; finished runs are skipped.")
    p.add_argument("config", nargs="?", help="collection config (.toml, .yaml or .yml)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="use a built-in config instead of CONFIG")
    p.add_argument("--print-preset", action="store_true",
                   help="print the --preset config as TOML (a starting point for your own) and exit")
    p.add_argument("--out", help="collection folder to build or resume")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda, cuda:1, mps)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..collection import PRESETS, preset_config
    from ..errors import TaskvecError
    from ..finetune import build_collection

    if args.print_preset:
        if not args.preset:
            raise TaskvecError("--print-preset needs --preset NAME")
        print(PRESETS[args.preset].strip())
        return 0
    if bool(args.config) == bool(args.preset):
        raise TaskvecError("give either a CONFIG file or --preset NAME (not both)")
    if not args.out:
        raise TaskvecError("--out DIR is required: the collection folder to build or resume")
    config = preset_config(args.preset) if args.preset else args.config
    col = build_collection(config, args.out, progress=not args.no_progress, device=args.device)
    print(f"collection: {col.root}")
    for r in col.runs:
        primary = r.record["primary_metric"]
        best = r.best()
        best_txt = f"{best.name} {best.metrics['validation'][primary]:.4g}" if best else "θ₀ (no checkpoint improved)"
        print(f"  {r.name:<16} n={r.n_train:<5} θ₀ val {primary} {r.pretrained['validation'][primary]:.4g}  "
              f"best {best_txt}  ({r.record['seconds']:.0f} s)")
    return 0
