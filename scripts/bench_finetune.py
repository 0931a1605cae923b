"""Time a collection preset and compare every run's fine-tuned validation error with θ₀'s.

    python scripts/bench_finetune.py [--preset minilm-vader] [--out DIR] [--device cpu]

Prints wall-clock and process-CPU seconds (the machine may be shared: CPU time / threads is the
idle-machine estimate), examples/s, and per run θ₀ vs best-checkpoint validation/test metrics.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from taskvec.collection import preset_config
from taskvec.finetune import build_collection


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="minilm-vader")
    ap.add_argument("--out", default=None, help="collection folder (default: a fresh temp folder)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--override", default="{}", help="JSON of top-level config keys to replace")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix=f"bench-{args.preset}-")
    cfg = preset_config(args.preset, **json.loads(args.override))
    t = time.perf_counter()
    col = build_collection(cfg, out, progress=False, device=args.device)
    wall = time.perf_counter() - t
    tm = col.meta["timing"]
    print(f"collection {out}: wall {wall:.0f} s (this invocation), head {tm['head_seconds']:.0f} s, "
          f"training {tm['train_seconds']:.0f} s wall / {tm['train_cpu_seconds']:.0f} s CPU on {tm['threads']} threads")
    ok = True
    for r in col.runs:
        p = r.record["primary_metric"]
        best = r.best()
        b = best.metrics if best else r.pretrained
        better = b["validation"][p] < r.pretrained["validation"][p]
        ok &= better or r.role == "rate"
        print(f"{r.name:<12} n={r.n_train:<4} val {p}: θ₀ {r.pretrained['validation'][p]:.4f} → best "
              f"{b['validation'][p]:.4f} ({best.name if best else 'θ₀'}); test {r.pretrained['test'][p]:.4f} → "
              f"{b['test'][p]:.4f}; {r.record['seconds']:.0f} s wall, {r.record.get('cpu_seconds', 0):.0f} s CPU, "
              f"{r.record['examples_per_second']:.1f} ex/s wall")
    print("fine-tuned beats θ₀ on validation for every task:", ok)


if __name__ == "__main__":
    main()
