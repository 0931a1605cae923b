"""`taskvec finetune CONFIG --out DIR`: build (or resume) a checkpoint collection."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a base model on each task of a collection config (resumable)",
        description="Fine-tune the base of a collection config (TOML/YAML; see taskvec.collection) on every "
                    "task, saving a checkpoint after every epoch and at fractions of the first, training and "
                    "validation curves and the exact optimiser settings. Rerunning resumes; finished runs are skipped.")
    p.add_argument("config", help="collection config (.toml, .yaml or .yml)")
    p.add_argument("--out", required=True, help="collection folder to build or resume")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda, cuda:1, mps)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..finetune import build_collection

    col = build_collection(args.config, args.out, progress=not args.no_progress, device=args.device)
    print(f"collection: {col.root}")
    for r in col.runs:
        primary = r.record["primary_metric"]
        best = r.best()
        best_txt = f"{best.name} {best.metrics['validation'][primary]:.4g}" if best else "θ₀ (no checkpoint improved)"
        print(f"  {r.name:<16} n={r.n_train:<5} θ₀ val {primary} {r.pretrained['validation'][primary]:.4g}  "
              f"best {best_txt}  ({r.record['seconds']:.0f} s)")
    return 0
