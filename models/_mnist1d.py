"""MNIST-1D (Greydanus 2020), generated locally in numpy.

The PyPI package ``mnist1d`` needs ``requests`` and its ``get_dataset`` downloads a pickle by
default; its ``make_dataset`` works offline but draws from (and reseeds) numpy's *global* RNG.
This module re-implements the documented generation procedure of ``mnist1d.data.make_dataset``
(version 0.0.2) with a local ``numpy.random.RandomState(seed)`` making the same calls in the same
order, so for equal settings it returns the same numbers as the package (checked in
tests/test_models.py when ``mnist1d`` is installed) without touching any global state.

Procedure, for each of the 10 digit templates (12-point 1-D curves) and each sample of the class:
pad with a random number of zeros, dilate (linear interpolation to template_len + max padding
points), scale by 1 + scale_coeff·(u − ½), translate circularly by a random shift, fill the padded
(zero) region with Gaussian-smoothed noise (σ_filter = 2), add i.i.d. Gaussian noise, add a random
linear shear, and downsample to ``final_seq_length`` points by linear interpolation. The samples are
shuffled and the whole set is standardised to mean 0 and standard deviation 1.

References:
    S. Greydanus, "Scaling down deep learning", arXiv 2011.14439 (2020);
    S. Greydanus and D. Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

# the 10 digit templates of mnist1d.data.get_templates
_TEMPLATES = np.asarray([
    [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
    [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
    [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
    [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
    [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
    [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
    [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
    [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
], dtype=np.float64)

DEFAULTS = {
    "template_len": 12,
    "padding": (36, 60),
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "final_seq_length": 40,
    "shuffle_seq": False,
}


def templates() -> dict[str, np.ndarray]:
    """The whitened templates: 'x' (10, 12), 't' (12,), 'y' (10,)."""
    x = _TEMPLATES.copy()
    x -= x.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True)
    x -= x[:, :1]  # the signal starts and ends at 0
    t = np.linspace(-5, 5, x.shape[1]) / 6.0
    return {"x": x / 6.0, "t": t, "y": np.arange(10)}


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _transform(x, t, rs: np.random.RandomState, cfg: dict, eps: float = 1e-8):
    low, high = cfg["padding"]
    n_pad = low + int(rs.rand() * (high - low + 1))
    new_x = np.concatenate([x + eps, np.zeros(n_pad)])
    n_dilated = cfg["template_len"] + high
    new_x = _interpolate(new_x, n_dilated)
    new_t = _interpolate(t, n_dilated)
    new_x = new_x * (1 + cfg["scale_coeff"] * (rs.rand() - 0.5))
    k = rs.choice(cfg["max_translation"])
    new_x = np.concatenate([new_x[-k:], new_x[:-k]])
    mask = new_x != 0
    corr = gaussian_filter(cfg["corr_noise_scale"] * rs.randn(*new_x.shape), 2)
    new_x = mask * new_x + (1 - mask) * corr
    new_x = new_x + cfg["iid_noise_scale"] * rs.randn(*new_x.shape)
    coeff = cfg["shear_scale"] * (rs.rand() - 0.5)
    new_x = new_x - coeff * np.linspace(-0.5, 0.5, len(new_x))
    return _interpolate(new_x, cfg["final_seq_length"]), _interpolate(new_t, cfg["final_seq_length"])


def make(n: int, seed: int, cfg: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, final_seq_length), y (n,), t (final_seq_length,)) before the train/test split."""
    rs = np.random.RandomState(seed)
    tpl = templates()
    per_class = n // 10
    xs, ys = [], []
    new_t = None
    for label in range(10):
        for _ in range(per_class):
            x, new_t = _transform(tpl["x"][label], tpl["t"], rs, cfg)
            xs.append(x)
            ys.append(tpl["y"][label])
    order = rs.permutation(len(ys))
    xs, ys = np.stack(xs)[order], np.stack(ys)[order]
    if cfg["shuffle_seq"]:
        xs = xs[..., rs.permutation(cfg["final_seq_length"])]
    std = xs.std()
    return (xs - xs.mean()) / std, ys, new_t / std
