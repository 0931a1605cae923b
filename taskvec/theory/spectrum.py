"""Eigen-decay of the eNTK spectrum: robust power-law / exponential fits, effective and
statistical dimension.

Fits are Huber-robust least squares in log space over a stated 1-based index window, with the
numerical-noise tail (μ̂_i < tol·μ̂₁) cut before the window is applied. Intervals come from a
seeded pairs bootstrap.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import TaskvecError, TaskvecWarning
from ._checks import eigenvalues

DEFAULT_TOL = 1e-6


@dataclass
class DecayFit:
    """One decay fit. power: μ̂_i ≈ c·i^(−rate); exponential: μ̂_i ≈ c·e^(−rate·i)."""

    model: str
    rate: float  # β (power) or γ (exponential)
    c: float
    r2: float  # R² of log μ̂ in the window
    rmse_log: float
    window: tuple[int, int]  # 1-based inclusive indices actually fitted
    n_points: int
    n_above_tol: int
    tol: float
    rate_ci: tuple[float, float] = (float("nan"), float("nan"))
    c_ci: tuple[float, float] = (float("nan"), float("nan"))
    ci_level: float = 0.95
    n_boot: int = 0
    seed: int = 0
    robust: bool = True
    extra: dict = field(default_factory=dict)

    def predict(self, i) -> np.ndarray:
        """The fitted eigenvalue μ̂_i at 1-based index (or array of indices) `i`: c·i^(−rate) or c·e^(−rate·i)."""
        i = np.asarray(i, dtype=np.float64)
        if self.model == "power":
            return self.c * i ** (-self.rate)
        return self.c * np.exp(-self.rate * i)

    def to_dict(self) -> dict:
        """The fit's fields as a JSON-ready dict, with the parameter's name and the formula spelled out."""
        d = asdict(self)
        d["parameter"] = "beta" if self.model == "power" else "gamma"
        d["formula"] = "mu_i = c * i^-beta" if self.model == "power" else "mu_i = c * exp(-gamma * i)"
        return d


def noise_cut(mu, tol: float = DEFAULT_TOL) -> int:
    """Number of leading eigenvalues with μ̂_i ≥ tol·μ̂₁ (the rest is numerical noise, never fitted)."""
    mu, _ = eigenvalues(mu)
    return int(np.sum(mu >= tol * mu[0]))


def _n_fittable(mu: np.ndarray, tol: float) -> int:
    """Leading eigenvalues (sorted descending) a log-space fit can use: ≥ tol·μ̂₁ and > 0."""
    return int(np.sum((mu >= tol * mu[0]) & (mu > 0)))


def _huber_line(x: np.ndarray, y: np.ndarray, robust: bool, iters: int = 100) -> np.ndarray:
    """Intercept and slope of y ≈ a + b·x by Huber IRLS (k = 1.345·MAD scale) or plain OLS."""
    X = np.column_stack([np.ones_like(x), x])
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    if not robust:
        return coef
    for _ in range(iters):
        r = y - X @ coef
        scale = 1.4826 * np.median(np.abs(r - np.median(r)))
        if scale <= 1e-12 * max(1.0, np.abs(y).max()):
            break
        k = 1.345 * scale
        w = np.minimum(1.0, k / np.maximum(np.abs(r), 1e-300))
        sw = np.sqrt(w)
        new = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)[0]
        if np.allclose(new, coef, rtol=1e-12, atol=1e-14):
            coef = new
            break
        coef = new
    return coef


def resolve_window(n_total: int, n_above_tol: int, window=None, *, tol: float | None = None,
                   mu: np.ndarray | None = None, name: str = "eigenvalues") -> tuple[int, int]:
    """1-based inclusive window; default [1, min(n_above_tol, ⌈n/2⌉)] — the bottom half of an
    empirical spectrum estimates the population eigenvalues poorly.

    A LAST beyond the eigenvalues above the noise cut is clipped to them, with a TaskvecWarning.
    `tol` and `mu` (sorted descending) only make the messages say what prevents a fit."""
    if window is None:
        lo, hi = 1, min(n_above_tol, max(3, int(np.ceil(n_total / 2))))
    else:
        lo, hi = int(window[0]), int(window[1]) if window[1] is not None else n_above_tol
    given = f"--window {window[0]} {window[1]}" if window is not None else None
    if window is not None and (lo < 1 or (window[1] is not None and hi < lo)):
        raise TaskvecError(f"{given}: decay-fit window [{window[0]}, {window[1]}] must be FIRST ≤ LAST, both ≥ 1 "
                           f"(1-based eigenvalue indices, e.g. --window 1 20)")
    cut = f"--tol {tol:g} × μ̂₁" if tol is not None else "the noise cut tol·μ̂₁"
    if n_total < 3:
        raise TaskvecError(f"{name}: only {n_total} eigenvalue(s); a decay fit needs at least 3 — save more of the "
                           "spectrum (e.g. a larger `taskvec ntk --top-k`)")
    if n_above_tol < 3:  # no window can hold 3 eigenvalues above the cut
        n_pos = int(np.sum(mu > 0)) if mu is not None else None
        if n_pos is not None and n_pos < 3:
            raise TaskvecError(
                f"{name}: only {n_pos} of {n_total} eigenvalues are nonzero (the kernel has rank {n_pos}); a decay fit "
                "needs at least 3 positive eigenvalues, whatever --window and --tol — the eNTK is degenerate on these "
                "probes: recompute it on more varied probe examples (or check the kernel)")
        lower = (f"lower --tol to {mu[2] / mu[0]:.2g} (μ̂₃/μ̂₁) or less to fit the small eigenvalues"
                 if mu is not None and n_pos is not None else "lower --tol to fit the small eigenvalues")
        raise TaskvecError(
            f"{name}: only {n_above_tol} of {n_total} eigenvalues are ≥ {cut}, so no --window holds the 3 a decay fit "
            f"needs (the rest are treated as round-off); {lower} if they are real spectrum, or recompute the kernel "
            "in float64 if they are not")
    clipped = hi > n_above_tol and window is not None and window[1] is not None
    hi = min(hi, n_above_tol)
    if n_above_tol == n_total:
        why, fix = f"there are only {n_total} eigenvalues", ""
    elif mu is not None and n_above_tol == int(np.sum(mu > 0)):
        why, fix = f"eigenvalues {n_above_tol + 1}–{n_total} are zero", ""
    else:
        why, fix = f"eigenvalues {n_above_tol + 1}–{n_total} lie below {cut}", "lower --tol"
    if hi - lo + 1 < 3:
        if lo > n_above_tol - 2:
            raise TaskvecError(
                f"{given}: {why}, so a window starting at {lo} holds {max(0, hi - lo + 1)} of the 3 a decay fit "
                f"needs; start --window at {n_above_tol - 2} or lower" + (f", or {fix}" if fix else ""))
        raise TaskvecError(f"{given} holds {hi - lo + 1} eigenvalue(s); a decay fit needs at least 3 — widen --window "
                           f"(e.g. --window {lo} {max(lo + 2, min(n_above_tol, int(np.ceil(n_total / 2))))})")
    if clipped:
        also = f"there are only {n_total} eigenvalues and " if window[1] > n_total and n_above_tol < n_total else ""
        warnings.warn(f"{given} clipped to [{lo}, {hi}]: {also}{why}" + (f" ({fix} to fit them)" if fix else ""),
                      TaskvecWarning, stacklevel=3)
    return lo, hi


def fit_decay(
    mu,
    model: str = "power",
    *,
    window=None,
    tol: float = DEFAULT_TOL,
    robust: bool = True,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    name: str = "eigenvalues",
) -> DecayFit:
    """Fit log μ̂_i on log i (model='power') or on i ('exponential') over `window` (1-based, inclusive).

    Eigenvalues below tol·μ̂₁ (and zeros, whatever tol) are never fitted; `name` labels the spectrum in errors."""
    if model not in ("power", "exponential"):
        raise TaskvecError(f"decay model must be 'power' or 'exponential', got {model!r}")
    mu, _ = eigenvalues(mu, name=name)
    n_above = _n_fittable(mu, tol)
    lo, hi = resolve_window(mu.size, n_above, window, tol=tol, mu=mu, name=name)
    idx = np.arange(lo, hi + 1, dtype=np.float64)
    vals = mu[lo - 1 : hi]
    x = np.log(idx) if model == "power" else idx
    y = np.log(vals)
    a, b = _huber_line(x, y, robust)
    fitted = a + b * x
    ss_res = float(np.sum((y - fitted) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    fit = DecayFit(
        model=model, rate=float(-b), c=float(np.exp(a)), r2=r2, rmse_log=float(np.sqrt(ss_res / x.size)),
        window=(lo, hi), n_points=int(x.size), n_above_tol=n_above, tol=float(tol),
        ci_level=level, n_boot=int(n_boot), seed=int(seed), robust=robust,
    )
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        boots = np.empty((n_boot, 2))
        for k in range(n_boot):
            pick = rng.integers(0, x.size, x.size)
            if np.unique(x[pick]).size < 2:
                pick[0], pick[-1] = 0, x.size - 1
            boots[k] = _huber_line(x[pick], y[pick], robust)
        q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
        lo_b, hi_b = np.percentile(-boots[:, 1], q)
        lo_c, hi_c = np.percentile(np.exp(boots[:, 0]), q)
        fit.rate_ci = (float(lo_b), float(hi_b))
        fit.c_ci = (float(lo_c), float(hi_c))
    return fit


def fit_spectrum(mu, *, window=None, tol: float = DEFAULT_TOL, n_boot: int = 200, seed: int = 0,
                 name: str = "eigenvalues") -> dict:
    """Both fits over the same window, and which describes the spectrum better (higher R²)."""
    mu, _ = eigenvalues(mu, name=name)
    window = resolve_window(mu.size, _n_fittable(mu, tol), window, tol=tol, mu=mu, name=name)  # warns once
    power = fit_decay(mu, "power", window=window, tol=tol, n_boot=n_boot, seed=seed, name=name)
    expo = fit_decay(mu, "exponential", window=window, tol=tol, n_boot=n_boot, seed=seed, name=name)
    best = "power" if power.r2 >= expo.r2 else "exponential"
    return {"power": power, "exponential": expo, "preferred": best}


def effective_dimension(mu, lam):
    """d(λ) = Σ_i μ̂_i / (μ̂_i + λ): how many modes a ridge of size λ (on the K/n scale) keeps."""
    mu, _ = eigenvalues(mu)
    lam_arr = np.asarray(lam, dtype=np.float64)
    if np.any(lam_arr <= 0):
        raise TaskvecError("effective dimension needs λ > 0")
    out = np.sum(mu[:, None] / (mu[:, None] + lam_arr.ravel()[None, :]), axis=0)
    return float(out[0]) if lam_arr.ndim == 0 else out.reshape(lam_arr.shape)


def statistical_dimension(mu, delta: float) -> int:
    """d(δ) = #{i : μ̂_i > δ²}; at the critical radius δ = ε̂_n this counts the modes the
    early-stopped estimator effectively fits (Yang, Pilanci & Wainwright 2017)."""
    mu, _ = eigenvalues(mu)
    return int(np.sum(mu > float(delta) ** 2))
