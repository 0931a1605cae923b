"""`taskvec scopes MODEL`: what each scope preset selects in a checkpoint, and its parameter count."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "scopes", help="list the tensors and parameter count each scope preset selects in a model",
        description="Open MODEL lazily (no weights are read) and show, for every preset (all, body, attention, "
                    "qkv, mlp, embeddings, norms) and optionally a regex, the tensors it selects and their "
                    "parameter count. Buffers and integer tensors are listed separately: no scope includes them.")
    p.add_argument("model", help="model folder, weights file, LoRA adapter or hub id")
    p.add_argument("--scope", help="also resolve this preset/regex")
    p.add_argument("--names", action="store_true", help="print every selected tensor name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--allow-network", action="store_true", help="allow downloading a hub id")
    p.set_defaults(func=run)


def run(args) -> int:
    import math

    from ..checkpoints import buffer_reason, open_checkpoint
    from ..io import to_json
    from ..scope import describe_scopes, resolve_scope

    ck = open_checkpoint(args.model, allow_network=args.allow_network)
    excluded = {k: r for k in ck.keys() if (r := buffer_reason(ck, k))}
    shapes = {k: tuple(ck.shape(k)) for k in ck.keys() if k not in excluded}
    info = describe_scopes(shapes)
    if args.scope:
        sel = resolve_scope(list(shapes), args.scope)
        info[args.scope] = {"description": "user scope", "tensors": sel, "n_tensors": len(sel),
                            "n_params": int(sum(math.prod(shapes[n]) for n in sel))}
    if args.json:
        print(to_json({"model": ck.source, "format": ck.format, "scopes": info, "excluded": excluded}))
        return 0
    total = sum(math.prod(s) for s in shapes.values())
    print(f"{ck.source} ({ck.format}{', LoRA deltas' if ck.is_delta else ''}): {len(shapes)} tensors, {total:,} parameters")
    for name, d in info.items():
        share = d["n_params"] / total if total else 0.0
        print(f"  {name:<12} {d['n_tensors']:>5} tensors {d['n_params']:>14,} params ({share:6.1%})  {d['description']}")
        if args.names:
            for t in d["tensors"]:
                print(f"      {t}  {list(shapes[t])}")
    if excluded:
        print(f"  excluded from every scope: {len(excluded)} ({', '.join(f'{k}: {r}' for k, r in list(excluded.items())[:4])}"
              f"{', …' if len(excluded) > 4 else ''})")
    return 0
