"""`taskvec project MODEL TASKVECTOR_OR_FINETUNE --data … --out DIR`: where a task vector lies in the eNTK eigenbasis."""

from __future__ import annotations

from pathlib import Path

from .ntk import add_model_arguments, check_args, kernel_from_args, load_setup


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "project", help="project a task vector on the pretrained model's eNTK eigenbasis (with a random control)",
        description="J·τ by forward-mode AD (checked against central finite differences), coefficients "
                    "c_i = u_iᵀJτ/sqrt(nμ̂_i), row-space energy fraction E/‖τ‖², spectral energy profile and "
                    "cumulative top-k energy, the constant mode's share and the profile with the constant "
                    "function projected out — for τ and for random directions with τ's per-tensor norms.")
    add_model_arguments(p)
    p.add_argument("task_vector", metavar="TASKVECTOR_OR_FINETUNE",
                   help="a task-vector file (TaskVector.save) or a fine-tuned checkpoint of MODEL (τ = ft − base)")
    p.add_argument("--kernel", default=None, help="reuse a kernel folder written by `taskvec ntk` on the same data")
    p.add_argument("--controls", type=int, default=3, help="random-direction controls (default 3)")
    p.add_argument("--fd-eps", type=float, default=1e-3,
                   help="finite-difference step, relative to ‖τ‖ (default 1e-3; 0 skips the check)")
    p.add_argument("--no-figures", action="store_true", help="skip projection.png/pdf")
    p.set_defaults(func=run)


def load_task_vector(path: str, base: str, scope: str, progress: bool):
    from ..errors import TaskvecError
    from ..vectors import TaskVector

    src = Path(path)
    if src.is_file() and src.suffix == ".safetensors":
        try:
            return TaskVector.load(src)
        except TaskvecError:
            raise
    if src.exists() or not src.suffix:
        return TaskVector.from_checkpoints(base, path, scope=scope, progress=progress)
    raise TaskvecError(f"{path}: neither a task-vector .safetensors file nor a fine-tuned checkpoint folder")


_OUTPUT_FIELDS = {"kind": "--output", "max_length": "--max-length (effective)", "label_words": "--label-words",
                  "head_sha": "head (digest of --head)", "m": "output dimension m"}


def _mismatch(where: str, what: str, saved, ours, fix: str = "recompute it or pass matching options") -> str:
    return f"{where} was computed with {what} {saved}, this run uses {ours}: {fix}"


def _check_output(where: str, saved: dict, ours: dict) -> None:
    from ..errors import TaskvecError

    for key, flag in _OUTPUT_FIELDS.items():
        if key in saved and saved.get(key) != ours.get(key):
            raise TaskvecError(_mismatch(where, flag, saved.get(key), ours.get(key)))


def _check_scope(where: str, saved: dict, ours: dict, recorded: str | None, scope: str) -> None:
    from ..errors import TaskvecError

    if list(saved.get("tensors") or []) == list(ours["tensors"]) and saved.get("n_params") == ours["n_params"]:
        return
    if recorded is not None and recorded != scope:
        raise TaskvecError(_mismatch(where, "--scope", recorded, scope))
    extra = sorted(set(saved.get("tensors") or []) ^ set(ours["tensors"]))
    raise TaskvecError(f"{where} was computed on a different parameter set ({len(saved.get('tensors') or [])} tensors, "
                       f"{saved.get('n_params')} parameters) than this run's --scope {scope} ({len(ours['tensors'])} "
                       f"tensors, {ours['n_params']} parameters{', e.g. ' + repr(extra[0]) if extra else ''}): "
                       f"recompute it or pass the --scope it was computed with")


def verify_kernel(result, args, model, output, examples) -> list[str]:
    """Refuse a --kernel folder computed with other settings, weights or probes than this run (its
    eigenbasis would silently be the wrong one); return what its ntk.json did not record to verify."""
    from ..errors import TaskvecError
    from ..ntk import build_space
    from ..ntk.kernel import _examples_hash, model_digest

    info, rec, where = result.info, result.info.get("inputs") or {}, f"--kernel {args.kernel}"
    unverified = []
    if "output" in info:
        _check_output(where, info["output"], output.describe())
    else:
        unverified.append("--output and its options")
    if "mode" in info and info["mode"] != args.mode:
        raise TaskvecError(_mismatch(where, "--mode", info["mode"], args.mode))
    dtype = str(next(model.parameters()).dtype)
    if "dtype" in info and info["dtype"] != dtype:
        raise TaskvecError(_mismatch(where, "--dtype", info["dtype"].replace("torch.", ""), args.dtype))
    if "examples" not in info:
        unverified.append("the probe examples")
    elif info["examples"] != _examples_hash(examples):
        was = f" (it records --data {rec['data']})" if rec.get("data") else ""
        raise TaskvecError(f"{where} was computed on other probe examples than --data {args.data}{was}: same count, "
                           f"different content or order; recompute it on these probes or pass the file it was "
                           f"computed on")
    if "model" not in info:
        unverified.append("the model weights")
    elif info["model"] != model_digest(model):
        was = f" (it records {rec['model']})" if rec.get("model") else ""
        raise TaskvecError(f"{where} was computed on other model weights than {args.model}{was}: recompute it on "
                           f"{args.model} or pass the base model it was computed on")
    if not isinstance(info.get("scope"), dict) or "tensors" not in info["scope"]:
        raise TaskvecError(f"{where}: its ntk.json records no parameter scope (scope.tensors), which projecting "
                           f"needs; recompute the kernel with `taskvec ntk`")
    space = build_space(model, args.scope, token_ids=output.encode(examples)["input_ids"])
    _check_scope(where, info["scope"], space.describe(), rec.get("scope"), args.scope)
    return unverified


def _check_nonzero(args, sq: float, what: str) -> None:
    """τ = 0 has no direction: every energy fraction would be 0/0."""
    from ..errors import TaskvecError

    if sq == 0.0:
        raise TaskvecError(f"{args.task_vector}: the task vector τ is zero {what} under --scope {args.scope} (the "
                           f"fine-tune equals the base model {args.model} there), so there is nothing to project; "
                           f"pass the fine-tuned checkpoint, or a wider --scope if it changed other tensors")


def _summary(p: dict) -> dict:
    keep = ("energy_row_space", "energy_fraction", "tau_sq_norm", "jtau_sq_norm", "top_k_cumulative",
            "unresolved_fraction", "n_modes_used", "constant_mode")
    out = {k: p[k] for k in keep if k in p}
    wc = p.get("without_constant")
    if wc is not None:
        out["without_constant"] = {k: wc[k] for k in ("energy_row_space", "jtau_sq_norm", "top_k_cumulative")}
    return out


def run(args) -> int:
    from ..errors import TaskvecError

    if args.controls < 0:
        raise TaskvecError(f"--controls must be 0 or more (got {args.controls})")
    if not args.fd_eps >= 0:
        raise TaskvecError(f"--fd-eps must be > 0 (a step relative to ‖τ‖, e.g. 1e-3), or 0 to skip the check "
                           f"(got {args.fd_eps})")
    check_args(args)
    import sys

    import numpy as np

    from ..io import atomic_dir, check_out_dir, atomic_save_npy, atomic_write_json

    inputs = [x for x in (getattr(args, "model", None), args.task_vector, args.kernel, getattr(args, "data", None)) if x]
    check_out_dir(args.out, overwrite=args.overwrite, inputs=inputs)  # fail before the work, not after it
    import warnings

    from ..checkpoints import warn_extra_tensors
    from ..errors import TaskvecWarning, counted, name_list
    from ..ntk import KernelResult, finite_difference, jvp, match_direction, project, random_control

    model, output, examples, desc = load_setup(args)
    tv = load_task_vector(args.task_vector, args.model, args.scope, not args.no_progress)
    alignment = tv.meta.get("alignment")
    if alignment and alignment.get("extra"):
        warn_extra_tensors({args.task_vector: alignment["extra"]}, "left out of τ (not projected)",
                           "projection.json under alignment.extra")
    missing = tv.meta.get("missing_in_ft") or []
    if missing:  # as `taskvec vectors` does: τ is partial, say so rather than project it silently
        warnings.warn(f"{counted(len(missing), 'tensor')} in scope missing in {args.task_vector}: "
                      f"{name_list(missing)}; τ is projected without them (listed in projection.json under "
                      "alignment.missing; narrow --scope to leave them out on purpose)", TaskvecWarning, stacklevel=2)
    _check_nonzero(args, tv.norm() ** 2, f"on all its {len(tv)} tensors")
    unverified = []
    if args.kernel:
        result = KernelResult.load(args.kernel)
        if result.n != len(examples):
            raise TaskvecError(f"{args.kernel}: kernel has n={result.n} but --data gives {len(examples)} examples; "
                               f"use the same probe set (and --limit)")
        unverified = verify_kernel(result, args, model, output, examples)
        if unverified:
            print(f"note: could not verify that --kernel {args.kernel} matches this run's {', '.join(unverified)}: "
                  f"its ntk.json does not record them", file=sys.stderr)
    else:
        result = kernel_from_args(args, model, output, examples)
        result.info["inputs"] = desc
    scope_names = set(result.info["scope"]["tensors"])
    direction = match_direction(model, tv)
    inside = {k: v for k, v in direction.items() if k in scope_names}
    outside = sorted(k for k in direction if k not in scope_names)
    if not inside:
        raise TaskvecError(f"{args.task_vector}: none of its {len(direction)} tensors is in the kernel scope "
                           f"{args.scope!r}; use the same --scope as the task vector")
    sq = float(sum(float(v.double().pow(2).sum()) for v in inside.values()))
    _check_nonzero(args, sq, f"on the {len(inside)} tensors inside the kernel scope")
    Jtau = jvp(model, output, examples, inside, progress=not args.no_progress)
    proj = project(result, Jtau, tau_sq_norm=sq)
    report = {"inputs": desc, "task_vector": str(args.task_vector), "scope": args.scope,
              "tensors_projected": len(inside), "tensors_outside_kernel_scope": outside, "alignment": alignment,
              "kernel": {k: result.info.get(k) for k in ("strategy", "n", "m", "n_params", "cache_key", "mode")},
              "kernel_unverified": unverified,
              "task": _summary(proj)}
    if args.fd_eps > 0:
        eps = args.fd_eps / max(np.sqrt(sq), 1e-12)
        fd = finite_difference(model, output, examples, inside, eps=eps)
        report["jvp_vs_finite_difference"] = {
            "relative_difference": float((fd - Jtau).norm() / Jtau.norm()) if Jtau.norm() > 0 else float("nan"),
            "eps": eps, "step_norm": args.fd_eps}
    controls = []
    for i in range(args.controls):
        ctrl = random_control({k: v.cpu() for k, v in inside.items()}, seed=args.seed + 1 + i)
        cp = project(result, jvp(model, output, examples, ctrl), tau_sq_norm=sq)
        controls.append(cp)
    if controls:
        report["random_controls"] = [_summary(c) for c in controls]
        ef = [c["energy_fraction"] for c in controls]
        report["energy_fraction_vs_control"] = {"task": proj["energy_fraction"], "control_mean": float(np.mean(ef)),
                                                "ratio": proj["energy_fraction"] / float(np.mean(ef))
                                                if np.mean(ef) > 0 else float("nan")}
    with atomic_dir(Path(args.out), overwrite=args.overwrite, inputs=inputs) as tmp:
        result.save(tmp)
        atomic_save_npy(tmp / "jtau.npy", Jtau.numpy())
        atomic_save_npy(tmp / "coefficients.npy", proj["c"])
        atomic_save_npy(tmp / "spectral_fraction.npy", proj["spectral_fraction"])
        if controls:
            atomic_save_npy(tmp / "control_spectral_fraction.npy", np.stack([c["spectral_fraction"] for c in controls]))
        atomic_write_json(tmp / "projection.json", report)
        if not args.no_figures:
            _figure(tmp, proj, controls)
    fr = proj.get("energy_fraction")
    print(f"row-space energy fraction E/‖τ‖² = {fr:.4g}"
          + (f" (random control {report['energy_fraction_vs_control']['control_mean']:.4g})" if controls else ""))
    print("cumulative spectral energy: " + ", ".join(f"top-{k} {v:.3f}" for k, v in proj["top_k_cumulative"].items()))
    if "jvp_vs_finite_difference" in report:
        print(f"J·τ vs finite differences: relative difference {report['jvp_vs_finite_difference']['relative_difference']:.2e}")
    if outside:
        print(f"note: {len(outside)} tensor(s) of τ lie outside the kernel scope and were not projected "
              f"(listed in projection.json)")
    print(f"written: {args.out}")
    return 0


def _figure(folder: Path, proj: dict, controls: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..plotting import PALETTE, paper_style, save_figure

    with paper_style():
        fig, axes = plt.subplots(1, 2, figsize=(7.0, 2.8), sharey=True)
        for ax, key, title in ((axes[0], None, "with constant mode"), (axes[1], "without_constant", "constant projected out")):
            src = proj if key is None else proj.get(key)
            if src is None:
                ax.set_visible(False)
                continue
            i = np.arange(1, len(src["cumulative"]) + 1)
            ax.plot(i, src["cumulative"], color=PALETTE[0], label="task vector")
            for j, c in enumerate(controls):
                cs = c if key is None else c.get(key)
                if cs is not None:
                    ax.plot(i, cs["cumulative"], color=PALETTE[1], alpha=0.7, lw=1,
                            label="random control" if j == 0 else None)
            ax.set_xscale("log")
            ax.set_xlabel("eigenmode i (descending μ̂)")
            ax.set_title(title)
        axes[0].set_ylabel("cumulative share of ‖Jτ‖²")
        axes[0].legend(frameon=False)
        save_figure(fig, folder, "projection")
        plt.close(fig)
