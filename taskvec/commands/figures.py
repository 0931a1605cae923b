"""`taskvec figures RESULTS_DIR --out DIR`: re-render every report figure from results.json alone."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "figures", help="re-render a report's figures from its results.json (no model, no recomputation)",
        description="Redraw every figure of an `analyze` report from DIR/results.json in a print-ready style "
                    "(vector output, single-column width, colour-blind-safe palette).")
    p.add_argument("results", help="report folder holding results.json (or the file itself)")
    p.add_argument("--out", required=True, help="folder for the figures")
    p.add_argument("--format", default="pdf", choices=["pdf", "svg", "png"], help="output format (default pdf)")
    p.add_argument("--style", default="paper", choices=["paper", "default"], help="figure style (default paper)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from ..errors import TaskvecError
    from ..report.figures import render_figures

    path = Path(args.results)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise TaskvecError(f"{path} not found; give a report folder written by `taskvec analyze`")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TaskvecError(f"{path} is not valid JSON ({exc}); was the report interrupted?") from None
    if not isinstance(results, dict) or results.get("format") != "taskvec-results-v1":
        raise TaskvecError(f"{path} is not a taskvec results file written by `taskvec analyze`")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    done = render_figures(results, args.out, formats=(args.format,), style=args.style)
    for f in done:
        print(f"{args.out}/{f['files'][0]}  — {f['caption']}")
    return 0
