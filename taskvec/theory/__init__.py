"""Kernel-regime theory of fine-tuning as code (pure numpy/scipy on arrays; no models loaded).

Definitions follow DESIGN.md §2 and docs/theory.md: eigen-decay fits, effective/statistical
dimension, the Raskutti–Wainwright–Yu (2014) early-stopping rule, predicted and measured rates,
kernel predictors on the eNTK from the pretrained start.
"""

from .predictors import align_with_finetune, early_stopped_kernel_gd, eig_normalised, kernel_gd_path, kernel_ridge_path
from .rates import compare_rates, kernel_gd_rates, loglog_slope, measured_rate, nonparametric_rate, predicted_rate
from .summary import analyse_spectrum
from .spectrum import DecayFit, effective_dimension, fit_decay, fit_spectrum, noise_cut, statistical_dimension
from .stopping import (
    StepSchedule,
    compare_with_curve,
    constant_mode,
    critical_radius,
    early_stopping,
    kernel_step,
    local_rademacher,
    project_out_constant,
    rkhs_radius,
    rwy_bound,
    sensitivity,
    sigma_first_difference,
    sigma_heldout,
    sigma_krr,
    sigma_spectral_tail,
    stopping_time,
    translate_to_training,
)

__all__ = [
    "compare_rates", "kernel_gd_rates", "loglog_slope", "measured_rate", "nonparametric_rate", "predicted_rate",
    "analyse_spectrum", "eig_normalised", "DecayFit", "StepSchedule", "compare_with_curve", "align_with_finetune", "constant_mode", "critical_radius", "early_stopped_kernel_gd",
    "early_stopping", "effective_dimension", "fit_decay", "fit_spectrum", "kernel_gd_path", "kernel_ridge_path",
    "kernel_step", "local_rademacher", "noise_cut", "project_out_constant", "rkhs_radius", "rwy_bound",
    "sensitivity", "sigma_first_difference", "sigma_heldout", "sigma_krr", "sigma_spectral_tail",
    "statistical_dimension", "stopping_time", "translate_to_training",
]
