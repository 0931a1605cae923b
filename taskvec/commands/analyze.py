"""`taskvec analyze COLLECTION --out DIR`: the full report on a built collection."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="analyse a checkpoint collection: eNTK, theory predictions beside measurements, arithmetic",
        description="Task vectors and their statistics; the pretrained model's eNTK on each task's probe set and "
                    "their union; projections with a random control; spectrum fits, the early-stopping time and "
                    "predicted rate next to the measured ones; kernel predictors next to the fine-tunes; task "
                    "addition, negation, interference and disentanglement measured and predicted. Writes "
                    "DIR/results.json, figures (PNG+PDF) and DIR/index.html atomically.")
    p.add_argument("collection", help="collection folder built by `taskvec finetune`")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--scope", default=None,
                   help="parameter scope of the kernel and task vectors (default: the scope the collection was "
                        "fine-tuned on)")
    p.add_argument("--strategy", default="auto", choices=["auto", "exact", "recompute", "sketch"],
                   help="eNTK strategy (default: chosen from --memory-gb)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory budget for the kernel (default: from free RAM)")
    p.add_argument("--eval-size", type=int, default=64, help="test/validation examples per task for the predictor and arithmetic stages (default 64)")
    p.add_argument("--kernel-train", type=int, default=None,
                   help="cap on training points per task in the theory kernel (default: all; cost grows with it)")
    p.add_argument("--probe-size", type=int, default=None, help="cap on each task's probe set (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import AnalyzeConfig, analyze

    cfg = AnalyzeConfig(scope=args.scope, strategy=args.strategy, memory_gb=args.memory_gb,
                        eval_size=args.eval_size, kernel_train=args.kernel_train,
                        probe_size=args.probe_size, device=args.device, progress=not args.no_progress)
    analyze(args.collection, args.out, config=cfg, overwrite=args.overwrite)
    print(f"report: {args.out}/index.html")
    return 0
