"""Seeded data sets for the experiments, returned as torch tensors in a train/test :class:`Split`.

Everything is generated with numpy from the given seed (or read from a file a package ships), in
float64, then cast: the numbers do not depend on torch's version, device or global RNG.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn

from . import _mnist1d
from ._init import check_int, check_seed
from ._networks import MLP
from ._tensors import Split, to_float, to_long

__all__ = [
    "digits",
    "mnist1d",
    "modular_addition",
    "sparse_regression",
    "teacher_dataset",
]


def _check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def _check_fraction(name: str, value, *, allow_one: bool = True) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value and (
        value <= 1 if allow_one else value < 1)
    if not ok:
        bound = "]" if allow_one else ")"
        raise ValueError(f"{name}: expected a number in (0, 1{bound}, got {value!r}")
    return float(value)


def _streams(seed: int, n: int) -> list[np.random.Generator]:
    """n independent generators from one seed (numpy SeedSequence.spawn)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(check_seed(seed)).spawn(n)]


# --- sparse regression (diagonal linear networks) -------------------------------------------------

def sparse_regression(n: int, p: int, sparsity: int, *, noise: float = 0.0, n_test: int = 1000,
                      seed: int = 0, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> Split:
    """Sparse linear regression, the diagonal-linear-network setting of Even et al. 2023.

    x_i ~ N(0, I_p) i.i.d.; β* has ``sparsity`` = k nonzero entries, on a uniformly random support,
    each ±1 with a random sign; y_i = ⟨x_i, β*⟩ + noise·ε_i, ε_i ~ N(0, 1), for the train and the
    test samples alike. In the overparametrised regime n < p the interpolators form an affine
    space and the implicit bias of (S)GD picks one, which is what makes this the DLN test bed.

    The planted vector, the train inputs, the train noise, the test inputs and the test noise come
    from five independent streams of the seed: the first rows of the train set do not depend on
    n, the train set does not depend on n_test, and X and β* do not depend on ``noise``.

    Args:
        n: train samples. p: dimension. sparsity: k, with 0 <= k <= p.
        noise: standard deviation of the label noise (>= 0).
        n_test: test samples (>= 0).
        seed: the seed.
        dtype, device: of the tensors (default: torch's default dtype, CPU).

    Returns:
        :class:`Split` with train = (X (n, p), y (n,)), test = (X (n_test, p), y (n_test,)), and
        info = {"beta_star": (p,), "support": (k,) int64 sorted, "noise": float}.

    Raises:
        ValueError: naming the argument, for bad sizes, sparsity, noise or seed.

    Example:
        >>> (X, y), _ = split = sparse_regression(20, 30, 3, seed=0, dtype=torch.float64)
        >>> int((split.info["beta_star"] != 0).sum()), X.shape, y.shape
        (3, torch.Size([20, 30]), torch.Size([20]))
        >>> bool(torch.allclose(X @ split.info["beta_star"], y))
        True

    References:
        Even, Pesme, Gunasekar, Flammarion, "(S)GD over diagonal linear networks: implicit bias,
        large stepsizes and edge of stability", NeurIPS 2023 (arXiv 2302.08982).
    """
    n, p = check_int("n", n), check_int("p", p)
    n_test = check_int("n_test", n_test, 0)
    k = check_int("sparsity", sparsity, 0)
    if k > p:
        raise ValueError(f"sparsity: expected at most p={p} nonzeros, got {k}")
    noise = _check_nonneg("noise", noise)
    r_beta, r_x, r_eps, r_xt, r_epst = _streams(seed, 5)
    support = np.sort(r_beta.choice(p, size=k, replace=False))
    beta = np.zeros(p)
    beta[support] = r_beta.choice([-1.0, 1.0], size=k)
    X = r_x.standard_normal((n, p))
    y = X @ beta + noise * r_eps.standard_normal(n)
    Xt = r_xt.standard_normal((n_test, p))
    yt = Xt @ beta + noise * r_epst.standard_normal(n_test)
    f = lambda a: to_float(a, dtype, device)  # noqa: E731
    return Split((f(X), f(y)), (f(Xt), f(yt)),
                 {"beta_star": f(beta), "support": to_long(support, device), "noise": noise})


# --- teacher / student -----------------------------------------------------------------------------

def _infer_in_dim(teacher: nn.Module) -> int:
    d = getattr(teacher, "in_dim", None)
    if isinstance(d, int):
        return d
    for m in teacher.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError("in_dim: cannot infer the teacher's input size (no `in_dim` attribute and "
                     "no nn.Linear layer); pass in_dim=")


def teacher_dataset(teacher: nn.Module | dict, n: int, seed: int = 0, *, n_test: int = 1000,
                    in_dim: int | None = None, noise: float = 0.0, task: str = "regression",
                    dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Split:
    """Gaussian inputs labelled by a (random) teacher network.

    x_i ~ N(0, I_in) i.i.d.; targets f*(x_i) (+ noise·ε_i for regression) or argmax_j f*(x_i)_j
    (classification). The teacher f* is run as given, in its own dtype and on its own device,
    under ``torch.no_grad()``; its train/eval mode is not changed. A teacher built from a spec is
    a float64 :class:`MLP`.

    Args:
        teacher: a ``torch.nn.Module``, or a dict of :class:`MLP` keyword arguments (``in_dim``,
            ``out_dim``, ``width``, ``depth``, optional ``bias``, ``activation``, ``seed``) from
            which a random teacher is built (``seed`` defaults to this function's ``seed``).
        n: train samples. seed: the seed of the inputs and noise.
        n_test: test samples (>= 0).
        in_dim: input size; default: the teacher's ``in_dim`` attribute or its first nn.Linear.
        noise: standard deviation of Gaussian label noise (regression only).
        task: ``"regression"`` (targets (n, out_dim) float) or ``"classification"`` (targets (n,)
            int64, the teacher's argmax).
        dtype, device: of the returned tensors.

    Returns:
        :class:`Split`; info = {"teacher": the teacher module, "task": task}.

    Raises:
        ValueError: naming the argument, for a bad teacher spec, size, noise, task or seed.

    Example:
        >>> split = teacher_dataset({"in_dim": 5, "out_dim": 1, "width": 8, "depth": 2}, 100)
        >>> (X, y), (Xt, yt) = split
        >>> X.shape, y.shape, Xt.shape
        (torch.Size([100, 5]), torch.Size([100, 1]), torch.Size([1000, 5]))
    """
    n = check_int("n", n)
    n_test = check_int("n_test", n_test, 0)
    noise = _check_nonneg("noise", noise)
    if task not in ("regression", "classification"):
        raise ValueError(f"task: expected 'regression' or 'classification', got {task!r}")
    if isinstance(teacher, dict):
        spec = dict(teacher)
        spec.setdefault("seed", seed)
        try:
            teacher = MLP(**spec, dtype=torch.float64)
        except TypeError as e:
            raise ValueError(f"teacher: bad MLP spec {teacher!r} ({e})") from None
    elif not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher: expected an nn.Module or a dict of MLP arguments, "
                         f"got {type(teacher).__name__}")
    d = _infer_in_dim(teacher) if in_dim is None else check_int("in_dim", in_dim)
    r_x, r_eps, r_xt, r_epst = _streams(seed, 4)
    ref = next(teacher.parameters(), None)
    t_kw = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}

    def label(X: np.ndarray, r_noise: np.random.Generator) -> torch.Tensor:
        with torch.no_grad():
            out = teacher(torch.from_numpy(X).to(**t_kw)).detach().to("cpu", torch.float64)
        out = out.numpy()
        if task == "classification":
            return to_long(out.argmax(-1), device)
        return to_float(out + noise * r_noise.standard_normal(out.shape), dtype, device)

    X = r_x.standard_normal((n, d))
    Xt = r_xt.standard_normal((n_test, d))
    return Split((to_float(X, dtype, device), label(X, r_eps)),
                 (to_float(Xt, dtype, device), label(Xt, r_epst)),
                 {"teacher": teacher, "task": task})


# --- scikit-learn's 8x8 digits ---------------------------------------------------------------------

def _permuted_split(n_total: int, n_train: int, seed: int):
    perm = np.random.default_rng(check_seed(seed)).permutation(n_total)
    return perm[:n_train], perm[n_train:]


def digits(seed: int = 0, test_fraction: float = 0.2, *, scale: str = "unit", size: int = 8,
           dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Split:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), split at random.

    The data ship with scikit-learn (``sklearn.datasets.load_digits``; nothing is downloaded).
    Images are flattened to 64 features; ``n_test = round(test_fraction · 1797)`` samples, chosen
    by a permutation seeded with ``seed``, form the test set (359 for the default 0.2).

    Args:
        seed: seed of the split.
        test_fraction: in (0, 1).
        scale: ``"unit"`` (default): pixels / 16, in [0, 1]; ``"standard"``: each feature
            standardised with the train set's mean and standard deviation (constant features keep
            standard deviation 1); ``"none"``: raw integer intensities 0…16 as floats.
        size: image side; 8 (default) keeps the originals, e.g. 28 upsamples them bilinearly
            (``torch.nn.functional.interpolate``, after scaling) to size x size, flattened to
            size² features, for networks shaped for MNIST (784 inputs). The upsampled data have
            rank at most 64.
        dtype, device: of the inputs (labels are int64).

    Returns:
        :class:`Split`: train = (X (1438, 64), y (1438,)), test = (X (359, 64), y (359,)) for the
        default fraction; info = {"n_classes": 10, "image_shape": (size, size)}.

    Raises:
        ImportError: if scikit-learn is not installed (``pip install scikit-learn``).
        ValueError: naming the argument, for a bad seed, test_fraction or scale.
    """
    test_fraction = _check_fraction("test_fraction", test_fraction, allow_one=False)
    if scale not in ("unit", "standard", "none"):
        raise ValueError(f"scale: expected 'unit', 'standard' or 'none', got {scale!r}")
    check_seed(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("digits() needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    X, y = data.data.astype(np.float64), data.target.astype(np.int64)
    n_test = int(round(test_fraction * len(y)))
    if not 0 < n_test < len(y):
        raise ValueError(f"test_fraction: {test_fraction} leaves an empty train or test set")
    tr, te = _permuted_split(len(y), len(y) - n_test, seed)
    Xtr, Xte = X[tr], X[te]
    if scale == "unit":
        Xtr, Xte = Xtr / 16.0, Xte / 16.0
    elif scale == "standard":
        mu, sd = Xtr.mean(0), Xtr.std(0)
        sd[sd == 0] = 1.0
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size: expected a positive integer image side, got {size!r}")
    if size != 8:
        def up(A):
            t = torch.as_tensor(A).reshape(-1, 1, 8, 8)
            return torch.nn.functional.interpolate(t, size=(int(size), int(size)), mode="bilinear",
                                                   align_corners=False).reshape(len(A), -1).numpy()

        Xtr, Xte = up(Xtr), up(Xte)
    return Split((to_float(Xtr, dtype, device), to_long(y[tr], device)),
                 (to_float(Xte, dtype, device), to_long(y[te], device)),
                 {"n_classes": 10, "image_shape": (int(size), int(size))})


# --- MNIST-1D ---------------------------------------------------------------------------------------

def mnist1d(n: int = 5000, seed: int = 42, *, train_fraction: float = 0.8,
            dtype: torch.dtype | None = None, device: torch.device | str | None = None,
            **config) -> Split:
    """MNIST-1D (Greydanus 2020): 1-D signals of length 40 from 10 digit templates.

    Generated locally (see ``models/_mnist1d.py``: a re-implementation of the package's
    ``make_dataset`` with a local RandomState, so the defaults n = 5000, seed = 42,
    train_fraction = 0.8 reproduce ``mnist1d.data.make_dataset(get_dataset_args())``: 4,000 train
    and 1,000 test signals). Nothing is downloaded and no global RNG is touched.

    Args:
        n: total number of signals, a multiple of 10 (n / 10 per class).
        seed: the seed (42 is the package's default).
        train_fraction: the first ``int(n · train_fraction)`` shuffled signals are the train set.
        dtype, device: of the inputs (labels are int64).
        **config: overrides of the generator settings: ``padding`` (36, 60), ``scale_coeff``
            0.4, ``max_translation`` 48, ``corr_noise_scale`` 0.25, ``iid_noise_scale`` 0.02,
            ``shear_scale`` 0.75, ``final_seq_length`` 40, ``shuffle_seq`` False.

    Returns:
        :class:`Split`: train = (X (n_train, 40), y (n_train,)), test likewise; the whole set is
        standardised (mean 0, std 1). info = {"t": (40,) the template's abscissae,
        "config": the settings used}.

    Raises:
        ValueError: naming the argument, for bad n, seed, train_fraction or config keys.

    Example:
        >>> (X, y), (Xt, yt) = mnist1d(100, seed=0)
        >>> X.shape, Xt.shape, sorted(set(y.tolist()) | set(yt.tolist())) == list(range(10))
        (torch.Size([80, 40]), torch.Size([20, 40]), True)

    References:
        S. Greydanus, "Scaling down deep learning", arXiv 2011.14439 (2020).
    """
    n = check_int("n", n, 10)
    if n % 10:
        raise ValueError(f"n: expected a multiple of 10 (n / 10 signals per class), got {n}")
    check_seed(seed)
    train_fraction = _check_fraction("train_fraction", train_fraction)
    unknown = set(config) - set(_mnist1d.DEFAULTS) - {"template_len"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown mnist1d setting; known: "
                         f"{sorted(_mnist1d.DEFAULTS)}")
    if "template_len" in config and config["template_len"] != 12:
        raise ValueError("template_len: the templates have 12 points")
    cfg = {**_mnist1d.DEFAULTS, **config}
    low, high = cfg["padding"]
    if not (isinstance(low, numbers.Integral) and isinstance(high, numbers.Integral)
            and 0 <= low <= high):
        raise ValueError(f"padding: expected integers (low, high) with 0 <= low <= high, "
                         f"got {cfg['padding']!r}")
    check_int("max_translation", cfg["max_translation"])
    check_int("final_seq_length", cfg["final_seq_length"], 2)
    for key in ("scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale"):
        _check_nonneg(key, cfg[key])
    X, y, t = _mnist1d.make(n, seed, cfg)
    n_train = int(n * train_fraction)
    return Split((to_float(X[:n_train], dtype, device), to_long(y[:n_train], device)),
                 (to_float(X[n_train:], dtype, device), to_long(y[n_train:], device)),
                 {"t": to_float(t, dtype, device), "config": cfg})


# --- modular addition (grokking) -------------------------------------------------------------------

def modular_addition(p: int = 97, train_fraction: float = 0.4, *, seed: int = 0,
                     encoding: str = "onehot", dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> Split:
    """All pairs (a, b) in {0, …, p−1}² labelled (a + b) mod p, split at random (grokking).

    The p² pairs, in the order index = a·p + b, are permuted with ``seed``; the first
    ``int(train_fraction · p²)`` form the train set (3,763 of 9,409 for p = 97 and 0.4).

    Encodings:
        ``"onehot"`` (default): x = concatenate(onehot_p(a), onehot_p(b)), a float vector of
        length 2p with two ones, for an MLP with ``in_dim = 2p`` and ``out_dim = p``.
        ``"tokens"``: x = (a, b, p), int64, a length-3 sequence over a vocabulary of p + 1 where
        token p stands for "="; for :class:`TinyTransformer` (``vocab = p + 1``), read the answer
        from the logits at the last position, ``logits[:, -1, :p]``.

    Args:
        p: modulus (>= 2; p = 97, a prime, in Power et al. 2022).
        train_fraction: in (0, 1].
        seed: seed of the split.
        encoding: ``"onehot"`` or ``"tokens"``.
        dtype, device: of the one-hot inputs (labels and tokens are int64).

    Returns:
        :class:`Split`: inputs (N, 2p) float or (N, 3) int64, labels (N,) int64;
        info = {"p": p, "encoding": encoding, "vocab": p + 1 for tokens (else None),
        "train_pairs": (N_train, 2), "test_pairs": (N_test, 2)} (int64 pairs (a, b)).

    Raises:
        ValueError: naming the argument, for bad p, train_fraction, encoding or seed.

    Example:
        >>> (X, y), (Xt, yt) = modular_addition(5, 0.6, seed=0)
        >>> X.shape, Xt.shape
        (torch.Size([15, 10]), torch.Size([10, 10]))
        >>> a, b = X[:, :5].argmax(1), X[:, 5:].argmax(1)
        >>> bool(((a + b) % 5 == y).all())
        True

    References:
        Power, Burda, Edwards, Babuschkin, Misra, "Grokking: generalization beyond overfitting
        on small algorithmic datasets", arXiv 2201.02177 (2022).
    """
    p = check_int("p", p, 2)
    train_fraction = _check_fraction("train_fraction", train_fraction)
    if encoding not in ("onehot", "tokens"):
        raise ValueError(f"encoding: expected 'onehot' or 'tokens', got {encoding!r}")
    a, b = np.divmod(np.arange(p * p), p)
    labels = (a + b) % p
    n_train = int(train_fraction * p * p)
    tr, te = _permuted_split(p * p, n_train, seed)

    def inputs(idx: np.ndarray) -> torch.Tensor:
        if encoding == "tokens":
            return to_long(np.stack([a[idx], b[idx], np.full(len(idx), p)], axis=1), device)
        x = np.zeros((len(idx), 2 * p))
        x[np.arange(len(idx)), a[idx]] = 1.0
        x[np.arange(len(idx)), p + b[idx]] = 1.0
        return to_float(x, dtype, device)

    pairs = np.stack([a, b], axis=1)
    return Split((inputs(tr), to_long(labels[tr], device)),
                 (inputs(te), to_long(labels[te], device)),
                 {"p": p, "encoding": encoding, "vocab": p + 1 if encoding == "tokens" else None,
                  "train_pairs": to_long(pairs[tr], device),
                  "test_pairs": to_long(pairs[te], device)})
