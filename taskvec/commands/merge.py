"""`taskvec merge`: build a merged model (task arithmetic, TIES, DARE, linear) as a Hugging Face folder."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from ..merge import METHODS

    p = subparsers.add_parser(
        "merge", help="merge fine-tunes of one base (task_arithmetic, ties, dare_linear, dare_ties, linear)",
        description="Merge fine-tuned models of one base, streaming one tensor at a time in float32, into a "
                    "Hugging Face folder (sharded safetensors, config and tokenizer from the base, and "
                    "taskvec_merge.json recording the method, parameters and conventions). Parameters are "
                    "named as in mergekit; --config reads a mergekit YAML instead.")
    p.add_argument("finetunes", nargs="*", metavar="FT",
                   help="fine-tuned models (folders, files, hub ids); list them before --weight/--density")
    p.add_argument("--base", help="the base (pretrained) model; required unless --config")
    p.add_argument("--method", choices=sorted(METHODS), help="merge method; required unless --config")
    p.add_argument("--out", required=True,
                   help="new output folder (refused if it already holds anything, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder taskvec wrote (e.g. an earlier merge); never an input, nor a "
                        "model taskvec did not merge")
    p.add_argument("--config", help="mergekit YAML (merge_method, base_model, models, parameters)")
    p.add_argument("--weight", type=float, nargs="+", default=None,
                   help="weight per fine-tune, or one for all (default 1)")
    p.add_argument("--density", type=float, nargs="+", default=None,
                   help="fraction of entries kept, per fine-tune or one for all (ties, dare_*; default 1 as in "
                        "mergekit: nothing trimmed or dropped, with a warning)")
    p.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=float, default=1.0,
                   help="global scale λ of the merged task vector (default 1)")
    p.add_argument("--seed", type=int, default=0, help="DARE drop seed (default 0)")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                      help="divide by the summed weights (default: on for ties and linear, off otherwise)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false",
                      help="do not divide by the summed weights (turns off the ties/linear default)")
    p.add_argument("--rescale", choices=["l1", "paper", "none"], default=None,
                   help="DARE rescale: l1 = mergekit (keep the tensor's L1 norm; default), paper = ×1/density")
    p.add_argument("--trim", choices=["tensor", "global"], default="tensor",
                   help="TIES trimming: top-k per tensor (mergekit, default) or one global threshold per model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="output dtype (default: each tensor's base dtype); arithmetic is always float32")
    p.add_argument("--scope", default="all", help="tensors to merge (preset or regex; others copied from the base)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 2GB, 500MB)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from ..errors import TaskvecError
    from ..merge import MergeParams, merge_checkpoints
    from ..checkpoints import warn_extra_tensors
    from ..merge.mergekit_yaml import read_mergekit_config

    if args.config:
        if args.finetunes or args.base or args.method:
            raise TaskvecError("give either --config mergekit.yml or --base/--method/FT..., not both")
        spec = read_mergekit_config(args.config)
        base, fts, method, params = spec.base, spec.models, spec.method, spec.params
        out_dtype = args.dtype or spec.out_dtype
        extra = {"mergekit_config": str(Path(args.config).resolve()), "notes": spec.notes}
        for note in spec.notes:
            print(f"note: {note}")
    else:
        if not (args.base and args.method and args.finetunes):
            raise TaskvecError("taskvec merge needs --base, --method and at least one fine-tune (or --config)")
        base, fts, method = args.base, args.finetunes, args.method
        params = MergeParams(weights=tuple(args.weight or (1.0,)),
                             densities=tuple(args.density) if args.density else None,
                             lambda_=args.lambda_, normalize=args.normalize, rescale=args.rescale, trim=args.trim,
                             seed=args.seed)
        out_dtype, extra = args.dtype, None
    out = merge_checkpoints(base, fts, method, params, args.out, out_dtype=out_dtype, scope=args.scope,
                            max_shard_size=args.max_shard_size, progress=not args.no_progress, extra_record=extra,
                            overwrite=args.overwrite)
    rec = json.loads((Path(out) / "taskvec_merge.json").read_text())
    warn_extra_tensors(rec["extra_tensors_ignored"], "not merged (the output holds the base's tensors only)",
                       "taskvec_merge.json under extra_tensors_ignored")
    print(f"merged {len(fts)} model(s) with {rec['method']} into {out} "
          f"({rec['merged_tensors']} tensors merged, {len(rec['copied_from_base'])} copied, {rec['seconds']} s)")
    return 0
