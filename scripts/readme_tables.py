"""Regenerate the demo section of README.md from a report's results.json (never typed by hand).

    python scripts/readme_tables.py taskvec-demo            # rewrites README between the markers
Copies the headline figures into docs/demo/ and replaces the text between
<!-- demo:begin --> and <!-- demo:end --> with tables built by taskvec.report.render.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from taskvec.io import atomic_write_text
from taskvec.report.render import arithmetic_rows, headline_rows, markdown_table, rate_rows, summary_rows

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"
FIGURES = ("spectra", "energy", "stopping", "predictors", "rates", "interference")


def section(results: dict, report: Path) -> str:
    meta = results["meta"]
    t = meta["timings_s"]
    out = [BEGIN, "",
           f"Measured by `taskvec demo` (taskvec {meta['taskvec_version']}, {meta['environment']['platform']}, "
           f"torch {meta['environment']['torch']}, {meta['environment']['threads']} threads); analysis "
           f"{t['total']:.0f} s. Regenerate with `python scripts/readme_tables.py taskvec-demo`.", "",
           "**Per task: predictions beside measurements** (test MSE on the VADER −4…4 scale)", "",
           markdown_table(headline_rows(results)), "",
           "**Rates in n** (slope of log test error on log n)", "", markdown_table(rate_rows(results)), "",
           "**Task arithmetic** (merged model measured vs linearised prediction)", "",
           markdown_table(arithmetic_rows(results)), "",
           "**Agreement**", "", markdown_table(summary_rows(results)), ""]
    dest = ROOT / "docs" / "demo"
    dest.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        src = report / f"{name}.png"
        if src.is_file():
            shutil.copyfile(src, dest / src.name)
            out.append(f"![{name}](docs/demo/{name}.png)")
    out += ["", END]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="report folder written by taskvec demo / analyze")
    args = ap.parse_args()
    report = Path(args.report)
    results = json.loads((report / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    new = section(results, report)
    if BEGIN in readme and END in readme:
        readme = readme[: readme.index(BEGIN)] + new + readme[readme.index(END) + len(END):]
    else:
        readme += "\n## The demo's numbers\n\n" + new + "\n"
    atomic_write_text(ROOT / "README.md", readme)
    print(f"README.md updated from {report}")


if __name__ == "__main__":
    main()
