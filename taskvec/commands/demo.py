"""`taskvec demo`: build (once, cached) a real collection and analyse it — the main job."""

from __future__ import annotations

DEFAULT_PRESET = "minilm-vader"


def add_parser(subparsers) -> None:
    from ..collection import PRESETS

    p = subparsers.add_parser(
        "demo", help="fine-tune a real model on real tasks (cached) and write the full analysis report",
        description="Builds the preset's checkpoint collection once (cached under $TASKVEC_CACHE or "
                    "~/.cache/taskvec; reruns resume) and runs `taskvec analyze` on it. The default preset is "
                    "all-MiniLM-L6-v2 fine-tuned on the four VADER sentiment domains.")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"default {DEFAULT_PRESET}")
    p.add_argument("--out", default="taskvec-demo", help="report folder (default ./taskvec-demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import shutil
    import time
    from pathlib import Path

    from ..collection import preset_config
    from ..finetune import build_collection
    from ..io import atomic_dir, cache_dir, content_hash, sha256_file
    from ..report import AnalyzeConfig, analyze
    from ..report.render import headline_rows, markdown_table, rate_rows, summary_rows

    from ..errors import TaskvecError

    out = Path(args.out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "results.json").is_file())):
        raise TaskvecError(f"{out} exists and is not an earlier taskvec report; choose another --out "
                           "(the demo replaces only its own report folders)")
    t0 = time.perf_counter()
    progress = not args.no_progress
    cfg = preset_config(args.preset)
    col_dir = cache_dir() / "collections" / f"{args.preset}-{content_hash(cfg.to_dict())}"
    print(f"[taskvec demo] collection: {col_dir}")
    col = build_collection(cfg, col_dir, progress=progress, device=args.device)
    # sized for a 2-core CPU: theory kernels on 128 training + 64 test points per task, 32 probes per task
    acfg = AnalyzeConfig(progress=progress, device=args.device, kernel_train=128, probe_size=32, eval_size=64)
    from .. import __version__

    key = content_hash(sha256_file(col.root / "collection.json"), acfg.cache_key(), __version__)
    cached = cache_dir() / "reports" / f"{args.preset}-{key}"
    if not (cached / "results.json").is_file():
        analyze(col.root, cached, config=acfg, overwrite=True)
    with atomic_dir(out, overwrite=True, inputs=(col.root,)) as tmp:
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
    import json

    results = json.loads((out / "results.json").read_text())
    print(markdown_table(headline_rows(results)))
    print(markdown_table(rate_rows(results)))
    print(markdown_table(summary_rows(results)))
    print(f"[taskvec demo] done in {time.perf_counter() - t0:.0f} s; report: {out.resolve()}/index.html")
    return 0
