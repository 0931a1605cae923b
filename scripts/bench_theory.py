"""Benchmark the theory kernels against straightforward baselines measured in the same run.

  python scripts/bench_theory.py [--n 2000] [--steps 2000]

1. critical radius: exact piecewise solve vs scipy brentq on the defining inequality (n = 10⁵ eigenvalues)
2. stopping time: closed form + confirmation vs evaluating the rule at every t
3. kernel GD path: eigenbasis closed form vs explicit iteration f ← f − αK̂(f − r), all T steps recorded
Prints timings, speed-ups and the agreement of each pair.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy.optimize import brentq

from taskvec.theory import critical_radius, kernel_gd_path, local_rademacher, stopping_time


def timed(fn, repeat=3):
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--sigma", type=float, default=0.1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    mu = np.arange(1, 100_001.0) ** -1.5
    s = args.sigma

    def brent():
        h = lambda e: local_rademacher(mu, e) - e * e / (2 * math.e * s)  # noqa: E731
        return brentq(h, 1e-9, 2 * math.e * s + 1, xtol=1e-15, rtol=1e-15)

    t_exact, e_exact = timed(lambda: critical_radius(mu, s))
    t_brent, e_brent = timed(brent)
    print(f"critical radius (n=1e5): exact {t_exact * 1e3:.2f} ms, brentq {t_brent * 1e3:.2f} ms, "
          f"speed-up {t_brent / t_exact:.1f}x, |rel diff| {abs(e_exact - e_brent) / e_exact:.1e}")

    mu2 = np.arange(1, 2001.0) ** -2.0

    def loop():
        eta, t = 0.0, 0
        while True:
            t += 1
            eta += 1.0
            if local_rademacher(mu2, 1 / math.sqrt(eta)) > 1 / (2 * math.e * 0.02 * eta):
                return t - 1

    t_rule, st = timed(lambda: stopping_time(mu2, 0.02, 1.0))
    t_loop, T_loop = timed(loop, repeat=1)
    print(f"stopping time (n=2000, T̂={st['T_hat']}): rule {t_rule * 1e3:.2f} ms, per-t loop {t_loop * 1e3:.1f} ms, "
          f"speed-up {t_loop / t_rule:.0f}x, equal: {st['T_hat'] == T_loop}")

    n = args.n
    J = rng.normal(size=(n, 64)) * (np.arange(1, 65.0) ** -1.0)
    K = J @ J.T + 1e-3 * np.eye(n)
    r = rng.normal(size=n)
    a = 1.0 / np.linalg.eigvalsh(K / n).max()

    def explicit():
        f = np.zeros(n)
        Kn = K / n
        mse = np.empty(args.steps + 1)
        mse[0] = np.mean(r**2)
        for t in range(args.steps):
            f -= a * Kn @ (f - r)
            mse[t + 1] = np.mean((f - r) ** 2)
        return mse

    t_path, path = timed(lambda: kernel_gd_path(K, r, step=a, times=np.arange(args.steps + 1)), repeat=1)
    t_expl, mse = timed(explicit, repeat=1)
    print(f"kernel GD path (n={n}, T={args.steps}, every step): closed form {t_path:.2f} s, explicit {t_expl:.2f} s, "
          f"speed-up {t_expl / t_path:.1f}x, max rel diff {np.max(np.abs(path['train_mse'] - mse) / mse):.1e}")


if __name__ == "__main__":
    main()
