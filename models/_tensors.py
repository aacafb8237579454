"""The train/test container and numpy -> torch conversion (private)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np
import torch

__all__ = ["Split"]


def to_float(a: np.ndarray, dtype, device) -> torch.Tensor:
    """A float tensor (dtype None: torch's default dtype), converted from float64 numpy."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(dtype=dtype,
                                                                           device=device)


def to_long(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device=device)


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A train/test split: ``train = (inputs, targets)``, ``test = (inputs, targets)``.

    It unpacks like a pair, ``(X, y), (X_test, y_test) = split``, and ``split.train`` is the
    ``data`` tuple that ``rdsim.torch.OptimizerMap`` takes. ``info`` holds what generated the data
    (for example the planted ``beta_star`` of :func:`sparse_regression`, or the teacher network).
    """

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield self.train
        yield self.test

    def __len__(self) -> int:
        return 2

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test[0].shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Split":
        """A copy on ``device``; floating tensors (not integer labels or tokens) cast to ``dtype``.

        Tensors in ``info`` are left where they are.
        """
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return Split(tuple(move(t) for t in self.train), tuple(move(t) for t in self.test),
                     self.info)

    def __repr__(self) -> str:
        def shapes(pair):
            return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                             for t in pair)
        keys = ", ".join(self.info)
        return f"Split(train=[{shapes(self.train)}], test=[{shapes(self.test)}], info={{{keys}}})"
