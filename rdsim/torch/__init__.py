"""The torch backend of rdsim: optimizers on ``torch.nn.Module`` s as random dynamical systems, and
matrix-free curvature (Hessian operator, Lanczos, SLQ, traces, the sharpness dimension).

``import rdsim.torch`` (``import rdsim`` alone does not load PyTorch). Everything lives in private
modules; this file only re-exports, so that the name ``torch`` inside rdsim never shadows PyTorch.
"""

from .._sharpness import SharpnessResult
from ._hessian import (HessianOperator, LanczosResult, SpectralDensity, dense_hessian, hessian_eigenvalues,
                       hutchinson_trace, hutchpp_trace, lanczos, slq)
from ._monitor import TrainingMonitor
from ._optimizer_map import OptimizerMap
from ._sharpness import BatchSharpness, batch_sharpness, minibatch_hessian_eigenvalues, sharpness_dimension

__all__ = ["BatchSharpness", "batch_sharpness", "HessianOperator", "LanczosResult", "OptimizerMap", "SharpnessResult", "SpectralDensity", "dense_hessian",
           "hessian_eigenvalues", "hutchinson_trace", "hutchpp_trace", "lanczos", "minibatch_hessian_eigenvalues",
           "sharpness_dimension", "slq", "TrainingMonitor"]
