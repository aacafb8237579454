"""The torch backend of rdsim: optimizers on ``torch.nn.Module`` s as random dynamical systems.

``import rdsim.torch`` (``import rdsim`` alone does not load PyTorch). Everything lives in private
modules; this file only re-exports, so that the name ``torch`` inside rdsim never shadows PyTorch.
"""

from ._optimizer_map import OptimizerMap

__all__ = ["OptimizerMap"]
