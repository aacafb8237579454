"""MNIST / Fashion-MNIST from a user's local IDX files (nothing is downloaded)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ._tensors import to_float, to_long

__all__ = ["load_mnist", "read_idx"]

# IDX type codes (LeCun's format): the data are big-endian
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(file: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not; detected from its first bytes) into a numpy array.

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32, then the data in C order, big-endian.

    Returns:
        An array of the stored shape, in native byte order (uint8 for MNIST).

    Raises:
        FileNotFoundError: if ``file`` does not exist.
        ValueError: if the header is not an IDX header or the data size does not match it.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"IDX file not found: {file}")
    raw = file.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{file}: not an IDX file (the first two bytes must be zero)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{file}: unknown IDX type code 0x{code:02X}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{file}: truncated IDX header ({ndim} dimensions announced)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{file}: IDX header announces shape {shape} ({expected} bytes of "
                         f"data), but the file holds {len(raw) - header}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _find(root: Path, kind: str, what: str, idx: str) -> Path:
    names = [f"{kind}-{what}-{idx}-ubyte", f"{kind}-{what}.{idx}-ubyte"]
    candidates = [root / (n + ext) for n in names for ext in ("", ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"load_mnist: expected {names[0]} or {names[0]}.gz in {root} "
        f"(also looked for {', '.join(c.name for c in candidates[2:])})")


def load_mnist(path: str | os.PathLike, kind: str = "train", *, flatten: bool = True,
               normalize: bool = True, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST or Fashion-MNIST (same file names and format) from local IDX files.

    Looks in the folder ``path`` for ``{kind}-images-idx3-ubyte`` and ``{kind}-labels-idx1-ubyte``,
    each possibly gzipped (``.gz``); the spelling ``{kind}-images.idx3-ubyte`` is accepted too.
    Nothing is downloaded.

    Args:
        path: the folder holding the files.
        kind: ``"train"`` (60,000 images) or ``"t10k"`` (10,000; ``"test"`` is an alias).
        flatten: images as (N, rows·cols) (default) or (N, rows, cols).
        normalize: pixel values scaled to [0, 1] as floats (default); False keeps the raw uint8
            values 0…255 (dtype uint8, ``dtype`` ignored).
        dtype: float dtype of the images when ``normalize`` (default: torch's default dtype).
        device: of both tensors.

    Returns:
        (images, labels): images (N, 784) (or (N, 28, 28)), labels (N,) int64.

    Raises:
        FileNotFoundError: naming the expected file, if the folder or a file is missing.
        ValueError: for a bad ``kind``, a malformed file, or image and label counts that differ.
    """
    if kind == "test":
        kind = "t10k"
    if kind not in ("train", "t10k"):
        raise ValueError(f"kind: expected 'train' or 't10k' (or 'test'), got {kind!r}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"load_mnist: no folder {root} (expected it to hold "
                                f"{kind}-images-idx3-ubyte(.gz) and {kind}-labels-idx1-ubyte(.gz))")
    img_file = _find(root, kind, "images", "idx3")
    lab_file = _find(root, kind, "labels", "idx1")
    images, labels = read_idx(img_file), read_idx(lab_file)
    if images.ndim != 3:
        raise ValueError(f"{img_file}: expected 3 dimensions (N, rows, cols), got "
                         f"shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{lab_file}: expected 1 dimension (N,), got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"load_mnist: {img_file.name} holds {images.shape[0]} images but "
                         f"{lab_file.name} holds {labels.shape[0]} labels")
    if flatten:
        images = images.reshape(images.shape[0], -1)
    if normalize:
        x = to_float(images.astype(np.float64) / 255.0, dtype, device)
    else:
        x = torch.from_numpy(images).to(device=device)
    return x, to_long(labels, device)
