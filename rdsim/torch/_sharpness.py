"""The sharpness dimension of (S)GD on a torch model (arXiv 2604.19740; MATH.md §4) (private module)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import scipy.linalg
import torch
from torch import nn

from .._dimension import weighted_kaplan_yorke
from .._sharpness import (RANK_TOL, SharpnessResult, _minibatches, check_batch_size, check_flag, check_lr,
                          check_method, check_n_iter, check_options, check_pos_int, check_rank_tol, check_seed,
                          exact_sharpness_values, jackknife_sd, neutral_share, pseudo_spectrum, slq_counts)
from ._data import as_pair
from ._functional import FlatModel, check_no_dropout
from .._validate import check_nonneg_float
from ._hessian import HessianOperator, SpectralDensity, _check_basis, lanczos, lanczos_lockstep
from ._structured import structured_eigenvalues

__all__ = ["sharpness_dimension", "minibatch_hessian_eigenvalues", "batch_sharpness", "BatchSharpness"]

_NONFINITE = ("eigenvalues: the minibatch Hessian has non-finite entries (NaN or inf in the loss, its gradient "
              "or its curvature at these parameters)")

#: above this many parameters, the "exact" method finds the range of H_B adaptively instead of
#: forming the dense Hessian (exact up to ``rank_tol``; see :func:`minibatch_hessian_eigenvalues`)
DENSE_MAX = 2048


def minibatch_hessian_eigenvalues(op: HessianOperator, *, dense_max: int = DENSE_MAX, rank_tol: float = 1e-9,
                                  block: int = 128, seed: int = 0) -> np.ndarray:
    """All eigenvalues (ascending, float64) of the Hessian behind ``op``.

    For n <= ``dense_max`` the dense Hessian (n HVPs) goes to ``eigvalsh``. Above, the range of H
    is found adaptively (minibatch Hessians of networks have rank well below n: for a 784-16-16-10
    ReLU MLP on b samples it is at most ~16 b + 416): Gaussian blocks Omega_i of ``block`` columns
    are multiplied by H, the part of H Omega_i outside the current basis Q is added to Q (an SVD
    keeps its directions above ``rank_tol * ||H||``), and the loop stops when a whole new block lies
    in span(Q) to ``rank_tol * ||H||`` (checked on every column). Then H = Q M Q^T with
    M = (Q^T H Omega)(Q^T Omega)^+ from the products already made (no further HVPs), and the
    eigenvalues are eig(M) plus n - rank(Q) zeros. Eigenvalues of magnitude below
    ``rank_tol * ||H||`` are reported as zero; the others are accurate to about ``rank_tol * ||H||``
    in absolute terms (the error of the directions the basis leaves out).
    """
    n = op.n_params
    if n <= dense_max:
        H = op.dense().to("cpu", torch.float64).numpy()
        if not np.all(np.isfinite(H)):
            raise ValueError(_NONFINITE)
        return _eigvalsh(H)
    dev = op.device
    gen = torch.Generator().manual_seed(int(seed))

    def apply(Om):  # (n, c) -> H Om, float64
        return op._rows(Om.T.to(op.dtype).contiguous()).T.to(torch.float64)

    Q = torch.zeros((n, 0), dtype=torch.float64, device=dev)
    Oms, Ys = [], []
    scale = 0.0
    while True:
        c = min(block, n - Q.shape[1]) if Q.shape[1] < n else block
        Om = torch.randn((n, c), generator=gen, dtype=torch.float64).to(dev)
        Y = apply(Om)
        if not bool(torch.isfinite(Y).all()):
            raise ValueError(_NONFINITE)
        Oms.append(Om)
        Ys.append(Y)
        col = torch.linalg.vector_norm(Y, dim=0) / torch.linalg.vector_norm(Om, dim=0)
        scale = max(scale, float(col.max()))
        R = Y
        for _ in range(2):
            R = R - Q @ (Q.T @ R)
        rel = torch.linalg.vector_norm(R, dim=0) / torch.linalg.vector_norm(Om, dim=0)
        if scale == 0.0 or float(rel.max()) <= rank_tol * scale:
            break
        # new directions: R = Q1 R1 (thin QR), R1 = U1 S W^T (small SVD); keep S above the threshold
        Q1, R1 = torch.linalg.qr(R)
        U1, s, _ = np.linalg.svd(R1.cpu().numpy())  # (LAPACK through numpy: faster than torch's here)
        keep = torch.as_tensor(s > rank_tol * scale * math.sqrt(n))
        U = Q1 @ torch.as_tensor(U1, device=dev)[:, keep.to(dev)]
        U = U - Q @ (Q.T @ U)  # one more pass against the basis (U is already orthogonal to it to rounding)
        U, _ = torch.linalg.qr(U)
        Q = torch.cat([Q, U], dim=1)
        if Q.shape[1] >= n:  # full rank: the range finder has become the dense route
            break
    r = Q.shape[1]
    ev = np.zeros(n)
    if r > 0:
        Om = torch.cat(Oms, dim=1)
        Y = torch.cat(Ys, dim=1)
        # Q^T Y = M C with C = Q^T Omega (r x s, s >= r + block, well conditioned for Gaussian
        # Omega): M = (Q^T Y) C^T (C C^T)^-1, a Cholesky solve of an r x r system
        C = (Q.T @ Om).cpu().numpy()
        QY = (Q.T @ Y).cpu().numpy()
        G = C @ C.T
        M = scipy.linalg.solve(G, (QY @ C.T).T, assume_a="pos").T
        ev[:r] = _eigvalsh(0.5 * (M + M.T))
        ev[np.abs(ev) <= rank_tol * np.abs(ev).max()] = 0.0  # below rank_tol ||H||: zero, as documented
    return np.sort(ev)


def _eigvalsh(A: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric matrix, ascending (LAPACK syevr: the fastest driver here)."""
    return scipy.linalg.eigh(A, eigvals_only=True, driver="evr", check_finite=False)


#: the structured route forms the reduced Hessian densely up to this size (above: range finder on it)
STRUCTURED_DENSE_MAX = 4096


def _check_nonneg_int(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


def _split(X, y, size):
    return [(X[s:s + size], y[s:s + size]) for s in range(0, X.shape[0], size)]


def _data_and_batch(data, batch_size):
    """(X, y, n_samples, batch size) of a training set given as tensors, a Dataset or a DataLoader
    (materialised once; the minibatches are drawn by the caller), checked."""
    X, y = as_pair(data)
    if not hasattr(X, "shape") or not hasattr(y, "shape") or len(X.shape) == 0 or len(y.shape) == 0:
        raise TypeError("data: expected (inputs, targets) as tensors or arrays with a leading sample dimension")
    n_samples = int(X.shape[0])
    if n_samples == 0:
        raise ValueError("data: the training set is empty")
    if int(y.shape[0]) != n_samples:
        raise ValueError(f"data: inputs have {n_samples} samples, targets {int(y.shape[0])}")
    return X, y, n_samples, check_batch_size(batch_size, n_samples)


def sharpness_dimension(model: nn.Module, loss_fn: Callable, data, *, lr: float, batch_size: int,
                        method: str = "exact", n_batches: int = 32, seed: int = 0, n_iter: int | None = None,
                        dtype=None, chunk_size: int | None = 128, baselines: bool = True, eval_batch: int = 4096,
                        dense_max: int = DENSE_MAX, rank_tol: float = RANK_TOL, basis_bytes: float = 2e9,
                        reorth: str = "full", basis_dtype=None, basis_device=None, progress: bool = False,
                        structured: bool = True, weight_decay: float = 0.0, **options) -> SharpnessResult:
    """The sharpness dimension of SGD (learning rate ``lr``, minibatches of ``batch_size``) at a model's parameters.

    Methods (MATH.md §4; defaults in :data:`rdsim._sharpness.DEFAULTS`):

    * ``"exact"``: for ``n_batches`` random minibatches B, all eigenvalues of H_B
      (:func:`minibatch_hessian_eigenvalues`: dense up to ``dense_max`` parameters, an adaptive,
      verified range finder above), z_B = sorted log|1 - lr eig(H_B)|, lambda = the index-wise
      mean, SD = Kaplan-Yorke formula; ``stderr`` is the jackknife over minibatches.
      Structured route (``structured=True``, the default): when the first trainable module is an
      ``nn.Linear`` fed the raw (flattened) input, H_B's non-zero eigenvalues are those of the
      dense Hessian of the same network with first layer W_1 U fed X_B U (U an orthonormal basis
      of the row space of X_B, with a column of ones for a trainable bias; out x rank(X_B)
      first-layer parameters instead of out x in); the other N - n_reduced eigenvalues are exactly
      0 (neutral). Detected and guarded (see :mod:`rdsim.torch._structured`), else the route
      above; ``options["route"]`` says which ran. On the paper's 784-16-16-10 MLP at b = 32 it is
      over 10x faster than the range finder.
    * ``"slq"``, ``"kde"``, ``"ps"``: one Lanczos run of ``n_iter`` steps (default 100) from a
      Rademacher vector per minibatch (``n_batches`` runs, a fresh minibatch each, full
      reorthogonalisation unless ``reorth="none"``), the Ritz values pooled with total mass N, then the histogram
      (``bins``), kernel density (``bandwidth``, ``grid``) or equal-mass quantile (``n_quantiles``)
      pseudo-spectrum of z = log(|1 - lr alpha| + eps) and the weighted formula.

    ``weight_decay`` (wd >= 0, as torch.optim.SGD's ``weight_decay``: the gradient plus wd w): the
    Jacobian of the step is I - lr (H_B + wd I), so the eigenvalues (or Ritz values) are shifted by
    wd before the formula; the exact zeros of a rank-deficient H_B then contract (log(1 - lr wd))
    instead of counting as neutral. ``eigenvalues`` and ``density`` stay those of H_B.

    Neutral directions: per minibatch, eigenvalues with min(|alpha|, |alpha - 2/lr|) <=
    ``rank_tol * ||H_B||`` get z = 0 exactly before the formula (rank-deficient minibatch Hessians
    have exact zeros that ``eigvalsh`` returns as +-1e-17). ``n_expanding``, ``n_neutral``,
    ``n_contracting`` count z > 0, = 0, < 0 (means over minibatches); for the SLQ-based methods they
    are density-weighted estimates (the pooled Ritz masses in each class, neutral band
    ``max(rank_tol, 1e3 eps(dtype)) * max|alpha~|``), which sum to N.

    Baselines (``baselines=True``): ``rds_sharpness`` (lambda_1), ``lambda_max`` (of the full-data
    Hessian, Lanczos to 1e-6) and ``trace`` (mean of tr(H_B) over the minibatches for "exact"; the
    SLQ trace estimate otherwise; both unbiased for tr(H) of the full data).

    Args:
        model: the network at the point of interest (eval mode if it has BatchNorm; not modified).
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar mean loss.
        data: the training set ``(inputs, targets)``, a ``torch.utils.data.Dataset`` of (input,
            target) samples or a ``DataLoader`` (its data set, materialised once; the minibatches
            are drawn from ``seed``, not by the loader).
        lr: learning rate eta > 0; batch_size: minibatch size (<= the number of samples).
        method: "exact", "slq", "kde" or "ps"; n_batches: minibatches (= SLQ runs), >= 1.
        seed: seeds minibatches, start vectors and range-finder blocks.
        n_iter: Lanczos steps per SLQ run; dtype: evaluation dtype (default float64 for "exact",
            the parameters' dtype otherwise); chunk_size: HVP columns per vmap.
        eval_batch: samples per forward pass for the full-data lambda_max.
        basis_bytes: SLQ methods: the runs go in lockstep groups whose Krylov bases take at most
            about this many bytes (group x n_iter x N x itemsize; at least one run per group).
        reorth, basis_dtype, basis_device: SLQ methods: the Lanczos basis (see :func:`rdsim.torch.slq`):
            ``reorth="none"`` (no basis, the three-term recurrence: much faster at large N, ghost
            Ritz values that leave the density nearly unchanged), ``basis_dtype=torch.float32``
            (half the memory; default float64), ``basis_device="cpu"`` (keep the bases off the
            accelerator). The lambda_max baseline uses ``basis_dtype`` and ``basis_device`` with
            full reorthogonalisation.
        progress: a progress bar over minibatches.
        rank_tol: the range finder's tolerance and the neutral tolerance above, in [0, 1).
        structured: "exact": allow the structured first-layer route (False: never).
        **options: eps, bins, bin_value, grid, bandwidth, n_quantiles.

    Returns:
        :class:`rdsim.SharpnessResult`.

    Raises:
        ValueError / TypeError, naming the argument: lr <= 0, batch_size not a positive integer or
            above the data size, an unknown method or option, n_batches / n_iter / eval_batch /
            dense_max / chunk_size not positive integers, a negative seed, rank_tol outside [0, 1),
            basis_bytes <= 0, non-bool baselines / progress / structured, empty or mismatched data,
            non-finite parameters, BatchNorm or dropout in train mode, a non-scalar loss; a
            non-finite minibatch Hessian ("eigenvalues: ...").

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> X = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> res = sharpness_dimension(model, torch.nn.functional.mse_loss, (X, torch.zeros(3, 1)), lr=0.25,
        ...                           batch_size=3)
        >>> res.lambdas.round(4), round(float(res.value), 4)  # 1 - 0.25 * (2/3) (1, 4, 9) = 0.833, 0.333, -0.5
        (array([-0.1823, -0.6931, -1.0986]), 0.0)
    """
    lr = check_lr(lr)
    method = check_method(method)
    basis_dtype, basis_device, reorth = _check_basis(basis_dtype, basis_device, reorth, allow_none=True,
                                                     where="sharpness_dimension")
    check_options(options)
    n_batches = check_pos_int(n_batches, "n_batches")
    seed = check_seed(seed)
    eval_batch = check_pos_int(eval_batch, "eval_batch")
    dense_max = _check_nonneg_int(dense_max, "dense_max")
    rank_tol = check_rank_tol(rank_tol)
    wd = check_nonneg_float("weight_decay", weight_decay)
    baselines = check_flag(baselines, "baselines")
    progress = check_flag(progress, "progress")
    structured = check_flag(structured, "structured")
    if chunk_size is not None:
        chunk_size = check_pos_int(chunk_size, "chunk_size")
    if (isinstance(basis_bytes, bool) or not isinstance(basis_bytes, (int, float, np.integer, np.floating))
            or not math.isfinite(basis_bytes) or basis_bytes <= 0):
        raise ValueError(f"basis_bytes: expected a positive number of bytes, got {basis_bytes!r}")
    X, y, n_samples, bs = _data_and_batch(data, batch_size)
    if dtype is None and method == "exact":
        dtype = torch.float64
    full = HessianOperator(model, loss_fn, _split(X, y, eval_batch), dtype=dtype, chunk_size=chunk_size)
    N = full.n_params
    if bs == n_samples and method == "exact":
        n_batches = 1
    batches = _minibatches(n_samples, bs, int(n_batches), seed)
    Xd = full.batches[0][0] if len(full.batches) == 1 else torch.cat([b[0] for b in full.batches])
    yd = full.batches[0][1] if len(full.batches) == 1 else torch.cat([b[1] for b in full.batches])
    seeds = np.random.SeedSequence([int(seed), 7]).generate_state(len(batches))
    n_hvp = 0
    lam_max = trace = float("nan")
    if method == "exact":
        E = np.empty((len(batches), N))
        routes, ranks = [], []
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc=f"SD ({method})", unit="batch")
        for i, idx in enumerate(it):
            ti = torch.as_tensor(idx, device=full.device)
            op = full.on_batch(Xd.index_select(0, ti), yd.index_select(0, ti))
            got = None
            if structured and (not routes or routes[-1] == "structured"):
                got = structured_eigenvalues(op, dense_max=max(dense_max, STRUCTURED_DENSE_MAX), rank_tol=rank_tol,
                                             seed=int(seeds[i]), check=not routes)
            if got is not None:
                E[i], info = got
                n_hvp += info["n_hvp"] + op.n_hvp
                routes.append("structured")
                ranks.append(info["rank"])
            else:
                E[i] = minibatch_hessian_eigenvalues(op, dense_max=dense_max, rank_tol=rank_tol, seed=int(seeds[i]))
                n_hvp += op.n_hvp
                routes.append("dense" if N <= dense_max else "range finder")
        lam, Z, (n_exp, n_neu, n_con) = exact_sharpness_values(E + wd, lr, rank_tol)
        value = weighted_kaplan_yorke(lam, argname="lambdas")
        trace = float(E.sum(axis=1).mean())
        opts = {"dense_max": dense_max, "rank_tol": rank_tol, "weight_decay": wd,
                "route": routes[0] if len(set(routes)) == 1 else routes}
        if ranks:
            opts["structured_rank"] = ranks
        extra = dict(weights=np.ones(N), stderr=jackknife_sd(Z), eigenvalues=E, options=opts,
                     n_expanding=n_exp, n_neutral=n_neu, n_contracting=n_con,
                     neutral_share=neutral_share(value, np.count_nonzero(lam == 0.0)))
        vals = lam
    else:
        m = check_n_iter(n_iter, N)
        # runs in lockstep groups: each step one vmapped product over (vector, minibatch) pairs;
        # the group size bounds the Krylov bases (group * m * N * itemsize) to ~``basis_bytes``
        per_run = 0 if reorth == "none" else m * N * basis_dtype.itemsize
        group = len(batches) if per_run == 0 else max(1, min(len(batches), int(basis_bytes // per_run)))
        lkw = dict(reorth=reorth, basis_dtype=basis_dtype, basis_device=basis_device)
        nodes = np.full((len(batches), m), np.nan)
        wts = np.zeros((len(batches), m))
        starts = range(0, len(batches), group)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"SD ({method})", unit="group")
        for s0 in starts:
            sel = batches[s0:s0 + group]
            ti = torch.as_tensor(np.stack(sel), device=full.device)
            Xs, ys = Xd[ti], yd[ti]
            V0 = torch.stack([(torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(int(sd)))
                               .to(torch.float64) * 2 - 1) for sd in seeds[s0:s0 + group]]).to(full.device)
            try:
                if bs == n_samples:  # one batch for every run: plain vmapped products (much faster)
                    opb = full.on_batch(Xd, yd)
                    nd, wt, _ = lanczos_lockstep(lambda V: opb._rows(V.to(full.dtype)), V0, m, **lkw)
                    n_hvp += opb.n_hvp
                else:  # run r multiplies by the Hessian of its own minibatch: vmapped over (vector, batch)
                    before = full.n_hvp
                    nd, wt, _ = lanczos_lockstep(lambda V: full._rows_multi(V.to(full.dtype), Xs, ys), V0, m, **lkw)
                    n_hvp += full.n_hvp - before
            except FloatingPointError as err:
                raise ValueError(_NONFINITE) from err
            nodes[s0:s0 + len(sel), :nd.shape[1]] = nd
            wts[s0:s0 + len(sel), :wt.shape[1]] = wt
        dens = SpectralDensity(nodes=nodes, weights=wts, n=N, n_hvp=n_hvp)
        a, w = dens.pooled()
        if a.size == 0 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(w))):
            raise ValueError("eigenvalues: the Lanczos runs met a non-finite Hessian-vector product (NaN or inf in "
                             "the loss, its gradient or its curvature at these parameters)")
        a = a + wd
        vals, mult, opts = pseudo_spectrum(a, w, lr, method, **options)
        order = np.argsort(-vals, kind="stable")
        vals, mult = vals[order], mult[order]
        value = weighted_kaplan_yorke(vals, mult, argname="lambdas")
        trace = dens.trace()
        (n_exp, n_neu, n_con), ntol = slq_counts(a, w, lr, rank_tol, torch.finfo(full.dtype).eps)
        extra = dict(weights=mult, density=dens, options={**opts, "n_iter": m, "reorth": reorth,
                                                          "basis_dtype": str(basis_dtype).replace("torch.", ""),
                                                          "rank_tol": rank_tol, "neutral_tol": ntol,
                                                          "weight_decay": wd},
                     n_expanding=n_exp, n_neutral=n_neu, n_contracting=n_con, neutral_share=neutral_share(value, n_neu))
    if baselines:
        before = full.n_hvp
        lam_max = float(lanczos(full, 1, which="LA", tol=1e-6, seed=int(seed), basis_dtype=basis_dtype,
                                basis_device=basis_device).eigenvalues[0])
        n_hvp += full.n_hvp - before
    return SharpnessResult(value=value, method=method, lambdas=vals, rds_sharpness=float(vals[0]),
                           lambda_max=lam_max, trace=trace, lr=lr, batch_size=bs, n_batches=len(batches),
                           n_params=N, n_hvp=n_hvp, **extra)


@dataclasses.dataclass(frozen=True)
class BatchSharpness:
    """Batch sharpness: the mean over minibatches B of g_B^T H_B g_B / ||g_B||^2.

    Attributes:
        value: the mean over the minibatches; ``value * lr / 2`` near 1 is SGD's edge of
            stochastic stability (Andreyev & Beneventano 2024), where full-batch GD has
            lambda_max(H) lr / 2 near 1.
        stderr: standard error of the mean over the minibatches (NaN for one batch).
        values: one value per minibatch (minibatches with g_B = 0 are left out).
        batch_size: the minibatch size.
    """

    value: float
    stderr: float
    values: np.ndarray
    batch_size: int

    def __repr__(self) -> str:
        return (f"BatchSharpness({self.value:.6g} ± {self.stderr:.2g}, {self.values.size} minibatches "
                f"of {self.batch_size})")


def batch_sharpness(model: nn.Module, loss_fn: Callable, data, *, batch_size: int, n_batches: int = 32,
                    seed: int = 0, dtype=None) -> BatchSharpness:
    """The curvature of each minibatch loss along its own gradient, averaged over minibatches.

    For minibatches B of ``batch_size`` samples drawn without replacement (as
    :func:`sharpness_dimension` draws them, from ``seed``), g_B^T H_B g_B / ||g_B||^2 with g_B and
    H_B the gradient and Hessian of the minibatch loss at the model's parameters (one exact
    reverse-over-reverse Hessian-vector product per minibatch). Its mean, times lr / 2, is the
    stability ratio of SGD: SGD sits at 1 where GD's lambda_max(H) lr / 2 sits at 1 (Andreyev &
    Beneventano, "Edge of Stochastic Stability", 2024), while lambda_max(H) lr / 2 of the full-batch
    Hessian stays below 1 for small batches.

    Raises:
        ValueError / TypeError, naming the argument: batch_size not a positive integer or above
            the data size, n_batches not positive, a negative seed, empty or mismatched data,
            dropout in train mode, non-finite parameters.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> _ = model.weight.data.copy_(torch.tensor([[1.0, 1.0]]))
        >>> X = torch.eye(2, dtype=torch.float64) * torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = batch_sharpness(model, torch.nn.functional.mse_loss, (X, torch.zeros(2, 1)), batch_size=2)
        >>> round(res.value, 12)  # H = diag(1, 4), g = (1, 4): g.Hg / g.g = 65 / 17
        3.823529411765
    """
    n_batches = check_pos_int(n_batches, "n_batches")
    seed = check_seed(seed)
    X, y, n_samples, bs = _data_and_batch(data, batch_size)
    check_no_dropout(model, "the batch sharpness")
    fm = FlatModel(model, loss_fn, dtype=dtype)
    x = fm.flat()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("model: its parameters are not finite")
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    X = X.to(fm.device, fm.dtype) if X.is_floating_point() else X.to(fm.device)
    y = y.to(fm.device, fm.dtype) if y.is_floating_point() else y.to(fm.device)
    vals = []
    for idx in _minibatches(n_samples, bs, 1 if bs == n_samples else n_batches, seed):
        ii = torch.as_tensor(idx, device=fm.device)
        xb, yb = X.index_select(0, ii), y.index_select(0, ii)
        g, _ = fm.grad(x, xb, yb)
        gg = float(g.double().square().sum())
        if gg == 0.0:
            continue
        _, Hg, _ = fm.grad_hvp(x, g.detach()[None], xb, yb)
        vals.append(float((Hg[0].double() * g.double()).sum()) / gg)
    v = np.array(vals, dtype=np.float64)
    if v.size == 0:
        return BatchSharpness(float("nan"), float("nan"), v, bs)
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return BatchSharpness(float(v.mean()), se, v, bs)
