"""Networks and data sets for rdsim's experiments.

``rdsim`` never imports this package; experiments, the CLI and notebooks compose the two. All
constructors are seeded (a local ``torch.Generator`` or numpy ``SeedSequence``; no global RNG), and
nothing is downloaded: data are generated, ship with an installed package (scikit-learn's digits),
or are read from the user's local IDX files (MNIST, Fashion-MNIST).

Networks: :class:`DiagonalLinearNetwork`, :class:`MLP`, :func:`paper_mlp`,
:class:`TinyTransformer`, :func:`num_parameters`.

Data: :func:`sparse_regression`, :func:`teacher_dataset`, :func:`digits`, :func:`mnist1d`,
:func:`modular_addition`, :func:`load_mnist`, :func:`read_idx`, returned as torch tensors, most
in a train/test :class:`Split`.
"""

from ._data import digits, mnist1d, modular_addition, sparse_regression, teacher_dataset
from ._idx import load_mnist, read_idx
from ._networks import (ACTIVATIONS, MLP, DiagonalLinearNetwork, TinyTransformer, num_parameters,
                        paper_mlp)
from ._tensors import Split

__all__ = [
    "ACTIVATIONS",
    "DiagonalLinearNetwork",
    "MLP",
    "Split",
    "TinyTransformer",
    "digits",
    "load_mnist",
    "mnist1d",
    "modular_addition",
    "num_parameters",
    "paper_mlp",
    "read_idx",
    "sparse_regression",
    "teacher_dataset",
]
