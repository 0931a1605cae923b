"""The empirical NTK of the pretrained model: kernels, spectrum, JVPs, projections, cross-task blocks."""

from .cross import CrossTaskResult, cross_task, kernel_alignment, principal_angles
from .jvp import finite_difference, jvp, match_direction
from .kernel import STRATEGIES, KernelResult, compute_kernel, gram
from .params import ParamSpace, build_space
from .projection import eigendirections, project, random_control, random_like
from .spectrum import spectrum

__all__ = ["compute_kernel", "KernelResult", "STRATEGIES", "gram", "spectrum", "jvp", "finite_difference",
           "match_direction", "project", "random_control", "random_like", "eigendirections", "cross_task",
           "CrossTaskResult", "kernel_alignment", "principal_angles", "ParamSpace", "build_space"]
