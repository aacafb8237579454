"""Data given as tensors, a ``torch.utils.data.Dataset`` or a ``DataLoader`` (private).

rdsim's optimizer maps draw their own minibatches (the minibatch index sequence is the noise of
the random map, replayable from the seed), so they need indexable data: a ``Dataset`` or a
``DataLoader`` is materialised once into two tensors (inputs, targets), in index order for a
map-style data set and in iteration order for an iterable one. A ``DataLoader``'s own sampler,
batch size and shuffling are not used: the map's optimizer spec decides the minibatches.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_pair", "check_finite_data", "resolve_device"]


def resolve_device(device, default=None, *, name: str = "device") -> torch.device:
    """``device`` as a torch.device (None: ``default``), refusing one this torch cannot use.

    ValueError naming ``name`` for a string torch does not parse ('tpu9'), for 'cuda' when torch
    sees no CUDA device (instead of torch's AssertionError at first use), for an index past the
    devices present, and for 'mps' where MPS is not available.
    """
    if device is None:
        return torch.device("cpu") if default is None else torch.device(default)
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name}: expected a torch device or a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}: not a torch device: {device!r} (expected e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {str(device)!r} was asked for but torch sees no CUDA device "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {str(device)!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{name}: 'mps' was asked for but this torch has no MPS device")
    return dev


def check_finite_data(inputs, targets, where: str = "data") -> None:
    """ValueError when floating inputs or targets hold NaN or inf (a NaN loss would follow silently)."""
    for what, t in (("inputs", inputs), ("targets", targets)):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                raise ValueError(f"{where}: the {what} hold {int(bad.sum())} non-finite value(s) (NaN or inf)")


def _stack(items, what):
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack([torch.as_tensor(t) for t in items])
    if isinstance(first, (int, np.integer)):
        return torch.as_tensor(np.asarray(items, dtype=np.int64))
    if isinstance(first, (float, np.floating)):
        return torch.as_tensor(np.asarray(items, dtype=np.float64))
    try:
        return torch.as_tensor(np.stack([np.asarray(t) for t in items]))
    except (TypeError, ValueError) as err:
        raise TypeError(f"data: the {what} of the data set's samples are {type(first).__name__}, "
                        "not tensors, arrays or numbers") from err


def _pair_of(sample, where):
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise TypeError(f"data: {where} must be (inputs, targets) pairs, got {type(sample).__name__}"
                        + (f" of length {len(sample)}" if isinstance(sample, (tuple, list)) else ""))
    return sample


def as_pair(data, *, name: str = "data"):
    """(inputs, targets) from a pair of tensors/arrays, a map-style or iterable ``Dataset``, or a
    ``DataLoader`` (whose data set is materialised; see the module docstring).

    Raises:
        TypeError: anything else, or samples that are not (input, target) pairs.
        ValueError: an empty data set.
    """
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
        return data[0], data[1]
    if isinstance(data, DataLoader):
        ds = data.dataset
        if isinstance(ds, IterableDataset):
            xs, ys = [], []
            for batch in data:
                xb, yb = _pair_of(batch, f"{name}: the loader's batches")
                xs.append(torch.as_tensor(xb))
                ys.append(torch.as_tensor(yb))
            if not xs:
                raise ValueError(f"{name}: the DataLoader yielded no batches")
            return torch.cat(xs), torch.cat(ys)
        data = ds
    if isinstance(data, IterableDataset):
        samples = [_pair_of(s, "the data set's samples") for s in data]
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                        and not isinstance(data, (tuple, list, np.ndarray, torch.Tensor))):
        tensors = getattr(data, "tensors", None)
        if isinstance(tensors, tuple) and len(tensors) == 2:  # TensorDataset: no copy
            return tensors
        n = len(data)
        samples = [_pair_of(data[i], "the data set's samples") for i in range(n)]
    else:
        raise TypeError(f"{name}: expected (inputs, targets) tensors, a torch.utils.data.Dataset or a "
                        f"DataLoader, got {type(data).__name__}")
    if not samples:
        raise ValueError(f"{name}: the data set is empty")
    return _stack([s[0] for s in samples], "inputs"), _stack([s[1] for s in samples], "targets")
