"""rdsim: optimizers as random dynamical systems.

Lyapunov spectra, Kaplan-Yorke and sharpness dimensions of (random) maps, flows and optimizers,
on a numba backend for toy systems and a torch backend for neural networks.
"""

from ._dimension import Dimension, kaplan_yorke_dimension, sharpness_dimension
from ._lyapunov import LyapunovCheckpoint, LyapunovResult, lyapunov_spectrum
from ._ladder import LadderResult, dimension_ladder, rds_sharpness
from ._sharpness import SharpnessResult, loss_sharpness_dimension
from ._systems import AbstractNumbaSystem, AbstractSystem, Flow, Map
from ._optimizer_map import OptimizerMap, optimizer_map
from . import losses, optim, systems, testing

__version__ = "0.1.0"

__all__ = [
    "AbstractNumbaSystem",
    "AbstractSystem",
    "Dimension",
    "Flow",
    "LadderResult",
    "LyapunovCheckpoint",
    "LyapunovResult",
    "Map",
    "OptimizerMap",
    "SharpnessResult",
    "dimension_ladder",
    "kaplan_yorke_dimension",
    "loss_sharpness_dimension",
    "losses",
    "lyapunov_spectrum",
    "optim",
    "optimizer_map",
    "rds_sharpness",
    "sharpness_dimension",
    "systems",
    "testing",
]
