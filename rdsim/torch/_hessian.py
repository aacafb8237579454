"""Matrix-free curvature of a loss over a ``torch.nn.Module`` (MATH.md §6) (private module).

Public names (re-exported by :mod:`rdsim.torch`): :class:`HessianOperator`, :func:`dense_hessian`,
:func:`hessian_eigenvalues`, :func:`lanczos`, :class:`LanczosResult`, :func:`slq`,
:class:`SpectralDensity`, :func:`hutchinson_trace`, :func:`hutchpp_trace`.

Policies:

* HVPs are reverse-over-reverse (``vjp`` of ``grad(L)``, the pullback batched over columns with
  ``vmap``), or forward-over-reverse ``jvp(grad(L))(w; v)`` where an operation has no double
  backward (:attr:`HessianOperator.hvp_mode`; one implementation,
  :func:`rdsim.torch._functional.grad_hvp_rows`), in chunks of ``chunk_size`` columns (memory
  grows linearly with it). A fully connected chain (Linear layers and elementwise activations,
  mean cross-entropy or MSE) has them written out instead (``hvp_mode == "mlp"``,
  :mod:`rdsim.torch._mlp`, recognised and checked on the first batch), also for products over
  per-row batches (``_rows_multi``, lockstep SLQ with a minibatch per run).
* Over several batches the loss is the sample-weighted mean: H = sum_b (n_b / N) H_b, for a
  ``loss_fn`` that returns the mean over its batch.
* BatchNorm in train mode is refused: there the loss of a sample depends on the whole minibatch
  (batch statistics), so "the Hessian over a data set" would depend on how the data were cut into
  batches, and a forward pass in train mode would update the running statistics. Curvature is
  taken in eval mode (running statistics as constants; call ``model.eval()``). Dropout in train
  mode is refused too (it makes the loss random). The model is never modified.
* ``dtype=torch.float64`` evaluates everything on float64 copies of parameters, buffers and data.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from ._data import as_pair, check_finite_data, resolve_device
from ._functional import (chain_products, ensure_chain, grad_hvp_chain_or_auto, hvp_rows_per_batch,
                          with_hvp_fallback)

__all__ = ["HessianOperator", "LanczosResult", "SpectralDensity", "dense_hessian", "hessian_eigenvalues",
           "hutchinson_trace", "hutchpp_trace", "lanczos", "lanczos_lockstep", "slq"]


def _check_pos_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_curvature_modes(model: nn.Module):
    """Refuse modules whose train mode makes the Hessian ill-defined (BatchNorm, dropout)."""
    for name, mod in model.named_modules():
        if not mod.training:
            continue
        label = f"{name!r} ({type(mod).__name__})" if name else type(mod).__name__
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"model: module {label} is BatchNorm in train mode. Curvature is taken in eval mode: in "
                "train mode each sample's loss depends on the whole minibatch through the batch statistics, "
                "so the Hessian would depend on how the data are batched, and every forward pass would "
                "update the running statistics. Call model.eval() (running statistics become constants).")
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            raise ValueError(f"model: module {label} applies dropout in train mode, which makes the loss random; "
                             "call model.eval() before computing curvature")
        if isinstance(mod, nn.MultiheadAttention) and mod.dropout > 0:
            raise ValueError(f"model: module {label} applies attention dropout in train mode; call model.eval()")


class HessianOperator:
    """The Hessian of a loss with respect to a model's parameters, as a matrix-free linear operator.

    ``H @ V`` (``matmat``) and ``H @ v`` (``matvec``) accept numpy arrays or torch tensors of shape
    (n,) or (n, k) and return the same kind. Columns are pushed through forward-over-reverse HVPs,
    ``vmap``-ed in chunks of ``chunk_size``; over several batches the products are averaged with
    weights n_b / N (the loss is a per-batch mean). ``n_hvp`` counts Hessian-vector products (one
    per column per full pass over the data).

    Args:
        model: the network (not modified; its parameters at construction are the point w).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (the mean over the batch).
        data: one batch ``(inputs, targets)``, an iterable of such batches (a list, a DataLoader:
            its batches as it yields them), or a ``torch.utils.data.Dataset`` of (input, target)
            samples (one batch of all of them); batches are moved to the device once, at construction.
        params: the point w as a flat vector (default: the model's trainable parameters).
        dtype: evaluation dtype (default: the parameters'); ``torch.float64`` for accuracy.
        device: default: the parameters' device.
        chunk_size: columns per vmapped HVP (default 128; memory grows linearly with it).

    Raises:
        TypeError / ValueError: a non-module model, malformed data, a non-scalar loss, BatchNorm or
            dropout in train mode (see the module docstring for why).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> X, y = torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
        >>> H = HessianOperator(model, torch.nn.functional.mse_loss, (X, y), dtype=torch.float64)
        >>> H.dense()  # mean of (w . x_i)^2 over the 3 samples: H = (2/3) X^T X
        tensor([[0.6667, 0.0000, 0.0000],
                [0.0000, 0.6667, 0.0000],
                [0.0000, 0.0000, 0.6667]], dtype=torch.float64)
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, *, params=None, dtype=None, device=None,
                 chunk_size: int | None = 128):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a function loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        check_curvature_modes(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: has no trainable parameters (requires_grad=True)")
        if dtype is None:
            dtype = named[0][1].dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: expected a floating torch dtype, got {dtype!r}")
        self.device = resolve_device(device, named[0][1].device)
        self.dtype = dtype
        self.chunk_size = None if chunk_size is None else _check_pos_int(chunk_size, "chunk_size")
        self.model, self.loss_fn = model, loss_fn
        self.param_names = [n for n, _ in named]
        self.param_shapes = [tuple(p.shape) for _, p in named]
        self._numels = [p.numel() for _, p in named]
        self.n_params = n = sum(self._numels)
        self.shape = (n, n)
        trainable = set(self.param_names)
        consts = {}
        for nm, p in model.named_parameters():
            if nm not in trainable:
                consts[nm] = self._cast(p.detach())
        for nm, b in model.named_buffers():
            consts[nm] = self._cast(b.detach())
        self._consts = consts
        if params is None:
            with torch.no_grad():
                w = torch.cat([p.detach().reshape(-1) for _, p in named])
        else:
            w = torch.as_tensor(np.asarray(params) if not isinstance(params, torch.Tensor) else params).reshape(-1)
            if w.numel() != n:
                raise ValueError(f"params: expected {n} values (the trainable parameters), got {w.numel()}")
        self.w = w.detach().to(device=self.device, dtype=dtype)
        if not bool(torch.isfinite(self.w).all()):
            raise ValueError("params: the parameters are not finite")
        self.batches = self._load_batches(data)
        self.n_samples = sum(int(b[0].shape[0]) for b in self.batches)
        self.n_hvp = 0
        #: "mlp" (written out for a fully connected chain, :mod:`rdsim.torch._mlp`), "reverse"
        #: (reverse-over-reverse HVPs) or "forward" where an operation has no double backward
        self.hvp_mode = "reverse"
        self.try_chain, self.chain, self.chain_reason = True, None, ""
        self._probe()

    # -- construction helpers --------------------------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def _tensor(self, a, what):
        if not isinstance(a, torch.Tensor):
            try:
                a = torch.as_tensor(np.asarray(a))
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"data: {what} must be a tensor or an array, got {type(a).__name__}") from err
        return self._cast(a.detach())

    def _load_batches(self, data):
        def is_pair(b):
            return isinstance(b, (tuple, list)) and len(b) == 2 and not isinstance(b[0], (tuple, list))

        from torch.utils.data import Dataset

        if is_pair(data) and isinstance(data[0], (torch.Tensor, np.ndarray)):
            raw = [data]
        elif isinstance(data, Dataset):  # a data set of samples: one batch, all of it
            raw = [as_pair(data)]
        else:
            try:
                raw = list(data)
            except TypeError:
                raise TypeError("data: expected a batch (inputs, targets) or an iterable of such batches, "
                                f"got {type(data).__name__}") from None
        if not raw:
            raise ValueError("data: no batches")
        out = []
        for i, b in enumerate(raw):
            if not is_pair(b):
                raise TypeError(f"data: batch {i} is not a pair (inputs, targets)")
            X, y = self._tensor(b[0], "inputs"), self._tensor(b[1], "targets")
            if X.ndim == 0 or y.ndim == 0 or X.shape[0] != y.shape[0]:
                raise ValueError(f"data: batch {i}: inputs {tuple(X.shape)} and targets {tuple(y.shape)} need the "
                                 "same leading (sample) dimension")
            if X.shape[0] == 0:
                raise ValueError(f"data: batch {i} is empty")
            check_finite_data(X, y, f"data: batch {i}")
            out.append((X, y))
        return out

    def _params(self, w):
        return {n: t.view(s) for n, t, s in zip(self.param_names, w.split(self._numels), self.param_shapes)}

    def loss_at(self, w, X, y):
        """The loss on batch (X, y) at the flat parameter vector w (differentiable)."""
        out = functional_call(self.model, (self._params(w), self._consts), (X,))
        return self.loss_fn(out, y)

    def _probe(self):
        X, y = self.batches[0]
        try:
            with torch.no_grad():
                loss = self.loss_at(self.w, X, y)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(f"loss_fn/model: evaluating the loss on the first batch failed: {err}") from err
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn: must return a scalar tensor (the mean loss over the batch), returned {shape}; "
                             "reduce it with .mean()")
        if not loss.is_floating_point():
            raise ValueError(f"loss_fn: must return a floating-point scalar, got dtype {loss.dtype}")

    # -- products --------------------------------------------------------------------------------
    def _hvp_batch(self, V: torch.Tensor, X, y) -> torch.Tensor:
        """H_b V for a (k, n) block of rows V (:func:`rdsim.torch._functional.grad_hvp_chain_or_auto`, in chunks)."""
        return grad_hvp_chain_or_auto(self, self.loss_at, self._numels, self.param_shapes, self.w, V, X, y,
                                      self.chunk_size)[1]

    def _rows_multi(self, V: torch.Tensor, Xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Row r of V times the Hessian on batch (Xs[r], ys[r]) (equal-size batches): written out for a
        fully connected chain (looked for on the first batch), else vmapped jointly over (row, batch)."""
        ensure_chain(self, self.loss_at, self._numels, self.param_shapes, self.w, Xs[0], ys[0])
        if self.hvp_mode == "mlp":
            out = chain_products(self, self.w, V, Xs, ys, self.chunk_size, per_row=True)[1]
        else:
            out = with_hvp_fallback(self, lambda mode: hvp_rows_per_batch(self.loss_at, self.w, V, Xs, ys,
                                                                          self.chunk_size, mode))
        self.n_hvp += V.shape[0]
        return out

    def _rows(self, V: torch.Tensor) -> torch.Tensor:
        """H applied to the rows of V (k, n) -> (k, n), averaged over batches by sample count."""
        out = None
        for X, y in self.batches:
            hv = self._hvp_batch(V, X, y)
            wgt = X.shape[0] / self.n_samples
            out = hv * wgt if out is None else out.add_(hv, alpha=wgt)
        self.n_hvp += V.shape[0]
        return out

    def _apply(self, V, transpose_in: bool):
        is_np = not isinstance(V, torch.Tensor)
        T = torch.as_tensor(np.asarray(V, dtype=np.float64)) if is_np else V
        if T.ndim not in (1, 2) or T.shape[0] != self.n_params:
            raise ValueError(f"V: expected shape ({self.n_params},) or ({self.n_params}, k), got {tuple(T.shape)}")
        in_dtype, in_device = T.dtype, T.device
        Tt = T.to(device=self.device, dtype=self.dtype)
        rows = Tt.reshape(1, -1) if Tt.ndim == 1 else Tt.T
        out = self._rows(rows.contiguous())
        out = out.reshape(-1) if T.ndim == 1 else out.T
        if is_np:
            return out.detach().to("cpu", torch.float64).numpy()
        return out.detach().to(device=in_device, dtype=in_dtype if in_dtype.is_floating_point else self.dtype)

    def on_batch(self, inputs, targets) -> "HessianOperator":
        """The Hessian of the loss on another batch at the same point (shares model and casts)."""
        batches = self._load_batches((inputs, targets))
        # look for the chain once, on the parent, so that every per-batch copy shares it
        ensure_chain(self, self.loss_at, self._numels, self.param_shapes, self.w, *batches[0])
        new = copy.copy(self)
        new.batches = batches
        new.n_samples = int(new.batches[0][0].shape[0])
        new.n_hvp = 0
        return new

    def matvec(self, v):
        """H v for v of shape (n,) (numpy or torch; the result has the input's kind)."""
        return self._apply(v, False)

    def matmat(self, V):
        """H V for V of shape (n, k) (numpy or torch)."""
        return self._apply(V, False)

    def __matmul__(self, V):
        return self._apply(V, False)

    def dense(self, *, chunk: int = 256) -> torch.Tensor:
        """The dense Hessian (n, n) in ``dtype`` (H times identity blocks; n HVPs), symmetrised."""
        n = self.n_params
        H = torch.empty((n, n), device=self.device, dtype=self.dtype)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            E = torch.zeros((e - s, n), device=self.device, dtype=self.dtype)
            E[torch.arange(e - s), torch.arange(s, e)] = 1.0
            H[s:e] = self._rows(E)
        return 0.5 * (H + H.T)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64, symmetric) over the same products."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=self.matvec, rmatvec=self.matvec, matmat=self.matmat,
                              rmatmat=self.matmat, dtype=np.float64)

    def trace(self, n_probes: int = 64, *, method: str = "hutch++", seed: int = 0) -> float:
        """Stochastic trace estimate: ``hutchpp_trace`` or ``hutchinson_trace`` with n_probes products."""
        if method == "hutch++":
            return hutchpp_trace(self, n_probes, seed=seed)
        if method == "hutchinson":
            return hutchinson_trace(self, n_probes, seed=seed)
        raise ValueError(f"method: expected 'hutch++' or 'hutchinson', got {method!r}")

    def __repr__(self) -> str:
        return (f"HessianOperator(n={self.n_params}, samples={self.n_samples}, batches={len(self.batches)}, "
                f"dtype={self.dtype}, device={self.device})")


def dense_hessian(model: nn.Module, loss_fn: Callable, data, *, dtype=None, chunk_size: int | None = 128) -> torch.Tensor:
    """The dense Hessian of the (sample-weighted mean) loss, (n, n): ``HessianOperator(...).dense()``."""
    return HessianOperator(model, loss_fn, data, dtype=dtype, chunk_size=chunk_size).dense()


# -------------------------------------------------------------------------------------------------
# operators as callables on torch blocks


def _check_symmetric(A: torch.Tensor, rtol: float, argname: str = "op"):
    """One random probe of symmetry: |u^T A v - v^T A u| <= rtol * max(||A u|| ||v||, ||A v|| ||u||)."""
    n = A.shape[0]
    UV = torch.randn((n, 2), generator=torch.Generator().manual_seed(0x5EED), dtype=torch.float64).to(A.device)
    AUV = A @ UV
    u, v = UV.unbind(1)
    Au, Av = AUV.unbind(1)
    gap = float(abs(torch.dot(v, Au) - torch.dot(u, Av)))
    scale = max(float(torch.linalg.vector_norm(Au) * torch.linalg.vector_norm(v)),
                float(torch.linalg.vector_norm(Av) * torch.linalg.vector_norm(u)))
    if gap > rtol * scale:
        raise ValueError(f"{argname}: the matrix is not symmetric (for random u, v: |u^T A v - v^T A u| = {gap:.3g}, "
                         f"{gap / scale:.2g} of ||A u|| ||v||, above {rtol:.1g}); Lanczos needs a symmetric operator "
                         "(pass (A + A^T) / 2 if that is what is meant)")


def _as_rows_fn(op, n=None, device=None, check_symmetric=False):
    """(rows (k, n) float64 -> A rows, n, device) for a HessianOperator, a matrix or a callable
    (whose vectors live on ``device``, default CPU). ``check_symmetric``: one random probe of an
    explicit matrix (see :func:`_check_symmetric`); operators and functions are assumed symmetric."""
    if isinstance(op, HessianOperator):
        def f(R):
            return op._rows(R.to(op.dtype)).to(torch.float64)
        return f, op.n_params, op.device
    if isinstance(op, (np.ndarray, torch.Tensor)):
        src = op.dtype
        A = torch.as_tensor(op, dtype=torch.float64)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"op: expected a square matrix, got shape {tuple(A.shape)}")
        if check_symmetric:
            low = src in (np.float32, np.float16, torch.float32, torch.float16, torch.bfloat16)
            _check_symmetric(A, 1e-3 if low else 1e-7)
        return (lambda R: R @ A.T.to(R.device)), A.shape[0], A.device
    if callable(op):
        if n is None:
            raise ValueError("n: the dimension is required when op is a function")
        n = _check_pos_int(n, "n")

        def f(R):
            out = op(R.T)
            out = torch.as_tensor(out, dtype=torch.float64, device=R.device)
            return out.T
        return f, n, torch.device("cpu") if device is None else torch.device(device)
    raise TypeError(f"op: expected a HessianOperator, a symmetric matrix or a function V (n, k) -> A V, "
                    f"got {type(op).__name__}")


def _rademacher(gen, shape, device):
    return (torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1).to(device)


# -------------------------------------------------------------------------------------------------
# the Lanczos recurrence (one implementation: lanczos, slq and the SLQ of sharpness_dimension use it)

#: DGKS criterion: another Gram-Schmidt pass when one leaves less than 1/sqrt(2) of the norm
_DGKS = 0.5 ** 0.5

#: breakdown (invariant subspace) when beta <= this * max_j ||A v_j||, by basis dtype: well above
#: the rounding level of the stored vectors (eps 2.2e-16 and 1.2e-7), far below any beta that matters
_BREAKDOWN = {torch.float64: 1e-12, torch.float32: 1e-6}

_REORTH = ("full", "none")


def _check_basis(basis_dtype, basis_device, reorth, *, allow_none: bool, where: str):
    """Validated (basis dtype, basis device or None, reorth)."""
    names = {"float64": torch.float64, "float32": torch.float32, "double": torch.float64, "float": torch.float32}
    dt = names.get(basis_dtype, basis_dtype) if isinstance(basis_dtype, str) else basis_dtype
    if dt is None:
        dt = torch.float64
    if dt in (np.float64, np.dtype(np.float64)):
        dt = torch.float64
    elif dt in (np.float32, np.dtype(np.float32)):
        dt = torch.float32
    if dt not in _BREAKDOWN:
        raise ValueError(f"basis_dtype: expected torch.float64 (default) or torch.float32, got {basis_dtype!r}")
    if reorth not in _REORTH:
        raise ValueError(f"reorth: expected 'full' or 'none', got {reorth!r}")
    if reorth == "none" and not allow_none:
        raise ValueError(f"reorth: 'none' is for spectral densities only (slq, sharpness_dimension's SLQ methods); "
                         f"{where} returns eigenvalues, and without reorthogonalisation the Krylov basis loses "
                         "orthogonality as Ritz values converge, so converged eigenvalues reappear as spurious "
                         "('ghost') copies. Use reorth='full' (the default), or basis_dtype=torch.float32 to halve "
                         "the basis memory")
    if basis_device is not None:
        basis_device = resolve_device(basis_device, name="basis_device")
    return dt, basis_device, reorth


def _gs_pass(Bj: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """W - Bj^T (Bj W) row by row: Bj (R, j, n) in the basis dtype/device, W (R, n) float64.

    Two batched matrix products in the basis dtype on the basis device (the batched layouts here,
    (1 x n)(n x j) then (1 x j)(j x n), stream the basis at memory speed; einsum's are 2-5x slower
    on CPU); the correction is subtracted in float64 on W's device.
    """
    Wb = W.to(device=Bj.device, dtype=Bj.dtype)
    c = torch.bmm(Wb[:, None, :], Bj.transpose(1, 2))  # (R, 1, j): the Gram-Schmidt coefficients
    corr = torch.bmm(c, Bj)[:, 0]  # (R, n)
    return W - corr.to(device=W.device, dtype=torch.float64)


def _orthogonalise(Bj: torch.Tensor, W: torch.Tensor):
    """Classical Gram-Schmidt of each row of W against its basis, repeated where DGKS asks for it.

    A second pass runs on the rows whose first pass left less than 1/sqrt(2) of their norm, and a
    third where the second did too (ARPACK's iterative refinement in dsaitr); a row still cancelling
    after the third pass is numerically in the span of its basis (an invariant subspace).
    Returns (W, norms (R,), in_span (R,) bool, number of extra row passes).
    """
    before = torch.linalg.vector_norm(W, dim=1)
    W = _gs_pass(Bj, W)
    after = torch.linalg.vector_norm(W, dim=1)
    again = (after < _DGKS * before).cpu()
    extra = 0
    for _ in range(2):
        if not bool(again.any()):
            break
        for r in again.nonzero().squeeze(1).tolist():  # row views: no copy of the sub-basis
            prev = after[r].clone()
            W[r:r + 1] = _gs_pass(Bj[r:r + 1], W[r:r + 1])
            after[r] = torch.linalg.vector_norm(W[r])
            again[r] = bool(after[r] < _DGKS * prev)
            extra += 1
    return W, after, again, extra


@dataclasses.dataclass(frozen=True)
class _Krylov:
    """The recurrences of R runs: run r has T_r = tridiag(betas[r, :L-1], alphas[r, :L], betas[r, :L-1])
    with L = lengths[r]; betas[r, L-1] is its last beta (the residual norm); a beta of exactly 0
    inside marks a restart (T_r is block diagonal there)."""

    alphas: np.ndarray
    betas: np.ndarray
    lengths: np.ndarray
    restarts: np.ndarray
    basis: torch.Tensor | None
    n_prod: int
    n_extra_passes: int


def _lanczos_runs(rows_fn, V0: torch.Tensor, n_steps: int, *, reorth: str = "full", restart: bool = False,
                  gens=None, basis_dtype=torch.float64, basis_device=None, stop=None) -> _Krylov:
    """R Lanczos recurrences in lockstep: one batched product ``rows_fn`` per step.

    ``rows_fn(V)`` maps a (R, n) float64 block whose row r is the current vector of run r to the
    block of products (run r may use its own operator, e.g. its own minibatch). Per step
    (Paige's ordering): w = A v_j - beta_{j-1} v_{j-1}, alpha_j = w . v_j, w -= alpha_j v_j; with
    ``reorth="full"`` w is then Gram-Schmidt-ed against the run's whole basis (a second and third
    pass where DGKS asks, :func:`_orthogonalise`), with ``"none"`` not (three-term recurrence, no
    stored basis); beta_j = ||w||. The vectors, alphas, betas and T are float64; the basis is
    stored in ``basis_dtype`` on ``basis_device`` (default: V0's device), and the vector a run
    multiplies is exactly the one stored (rounded to the basis dtype first).

    Breakdown (an invariant subspace: beta_j <= tol * max_i ||A v_i||, tol from :data:`_BREAKDOWN`,
    or w numerically in the span): with ``restart`` the run continues from a fresh Rademacher
    vector (from ``gens[r]``) orthogonalised against its basis, with beta_j = 0 (as ARPACK does),
    until its basis spans the space; without, the run stops there (its Gauss quadrature is then
    exact). ``stop(j, alphas, betas)`` (R = 1 only) may end the run after step j.
    """
    R, n = V0.shape
    m = min(int(n_steps), n)
    dev = V0.device
    store = reorth == "full"
    if restart and not store:
        raise ValueError("reorth: restarts at an invariant subspace need the full basis (reorth='full')")
    bdev = dev if basis_device is None else torch.device(basis_device)
    lowp = basis_dtype != torch.float64
    tol = _BREAKDOWN[basis_dtype]

    def stored(X):  # the vectors multiplied are the stored ones
        return X.to(basis_dtype).to(torch.float64) if lowp else X

    V = V0.to(torch.float64)
    V = stored(V / torch.linalg.vector_norm(V, dim=1, keepdim=True))
    basis = torch.empty((R, m, n), dtype=basis_dtype, device=bdev) if store else None
    Vprev = torch.zeros_like(V)
    prev_beta = torch.zeros(R, dtype=torch.float64, device=dev)
    A = np.zeros((R, m))
    B = np.zeros((R, m))
    alive = np.ones(R, dtype=bool)
    length = np.full(R, m)
    restarts = np.zeros(R, dtype=np.int64)
    scale = np.zeros(R)
    n_prod = extra = 0
    for j in range(m):
        if store:
            basis[:, j] = V.to(device=bdev, dtype=basis_dtype)
        W = rows_fn(V).to(torch.float64)
        if W is V:  # an identity-like rows_fn: never update its input in place
            W = W.clone()
        n_prod += int(alive.sum())
        # the (R, n) blocks are updated in place: at 10^5-10^6 parameters each fresh block is a
        # large allocation (page faults on every step), which cost more than the arithmetic
        wnorm = torch.linalg.vector_norm(W, dim=1).cpu().numpy()
        if not np.all(np.isfinite(wnorm)):  # a NaN or inf entry makes its row's norm non-finite
            raise FloatingPointError("lanczos: the operator returned non-finite values")
        scale = np.maximum(scale, wnorm)
        W.addcmul_(prev_beta[:, None], Vprev, value=-1.0)
        a = (W.unsqueeze(1) @ V.unsqueeze(2)).reshape(R)
        W.addcmul_(a[:, None], V, value=-1.0)
        if store:
            W, beta, in_span, e = _orthogonalise(basis[:, :j + 1], W)
            extra += e
            in_span = in_span.numpy()
        else:
            beta = torch.linalg.vector_norm(W, dim=1)
            in_span = np.zeros(R, dtype=bool)
        A[:, j] = a.cpu().numpy()
        bnp = beta.cpu().numpy()
        broke = alive & ((bnp <= tol * np.maximum(scale, 1e-300)) | in_span)
        bnp = np.where(broke, 0.0, bnp)
        B[:, j] = bnp
        # (at a breakdown the run restarts instead: the rest of the spectrum is still unexplored)
        if stop is not None and alive[0] and not broke[0] and stop(j, A[0, :j + 1], B[0, :j + 1]):
            length[0] = j + 1
            alive[0] = False
        if j == m - 1:
            break
        safe = torch.as_tensor(np.where(bnp > 0, bnp, 1.0), device=dev)
        Vn = W.div_(safe[:, None])
        for r in np.flatnonzero(broke & alive):
            z = _rademacher(gens[r], (1, n), dev) if restart else None
            if z is not None:
                z, nz, span, _ = _orthogonalise(basis[r:r + 1, :j + 1], z / math.sqrt(n))
                if not bool(span[0]) and float(nz[0]) > tol:  # (z was a unit vector)
                    Vn[r] = z[0] / nz[0]
                    restarts[r] += 1
                    continue
            length[r] = j + 1  # no restart (or the basis spans the space): the run ends here
            alive[r] = False
        if not alive.any():
            break
        Vn[torch.as_tensor(~alive, device=dev)] = 0.0  # finished runs multiply zeros from now on
        Vprev, V = V, stored(Vn)
        prev_beta = torch.as_tensor(bnp, device=dev)
    length[alive] = min(m, j + 1)
    return _Krylov(alphas=A, betas=B, lengths=length, restarts=restarts, basis=basis, n_prod=n_prod,
                   n_extra_passes=extra)


def _tridiag_eigh(alphas, betas):
    """Eigenvalues (ascending) and eigenvectors of tridiag(betas, alphas, betas), split at exact zeros
    of ``betas`` (restarts): each block is solved on its own, so the eigenvectors of later blocks
    have exactly zero first components (zero quadrature weight)."""
    from scipy.linalg import eigh_tridiagonal

    a = np.asarray(alphas, dtype=np.float64)
    b = np.asarray(betas, dtype=np.float64)
    m = a.size
    if m == 1:
        return a.copy(), np.ones((1, 1))
    cuts = np.flatnonzero(b == 0.0)
    if cuts.size == 0:
        return eigh_tridiagonal(a, b)
    theta = np.empty(m)
    S = np.zeros((m, m))
    for s, e in zip(np.r_[0, cuts + 1], np.r_[cuts + 1, m]):
        if e - s == 1:
            theta[s], S[s, s] = a[s], 1.0
        else:
            theta[s:e], S[s:e, s:e] = eigh_tridiagonal(a[s:e], b[s:e - 1])
    order = np.argsort(theta, kind="stable")
    return theta[order], S[:, order]


# -------------------------------------------------------------------------------------------------
# Lanczos


def _summary(a: np.ndarray) -> str:
    with np.printoptions(precision=5, suppress=False, threshold=12, edgeitems=4):
        return np.array2string(np.asarray(a), separator=", ", max_line_width=110)


@dataclasses.dataclass(frozen=True, repr=False)
class LanczosResult:
    """Outcome of :func:`lanczos` / :func:`hessian_eigenvalues` (``return_details=True``).

    Attributes:
        eigenvalues: (k,) the wanted Ritz values (descending for "LA" and "BE", ascending for "SA").
        residuals: (k,) ||A y - theta y|| of each Ritz pair (|beta_m s_m|, exact with full
            reorthogonalisation up to rounding).
        converged: (k,) residual <= tol * max(|theta|, eps^(2/3) ||T||).
        eigenvectors: (n, k) Ritz vectors (float64) or None.
        n_iter: Lanczos steps taken; n_hvp: operator products used.
        alphas, betas: the tridiagonal T (diagonal (m,), off-diagonal (m - 1,); a zero in ``betas``
            marks a restart after an invariant subspace).
        ritz_values, ritz_weights: all eigenvalues of T (ascending) and the squared first
            components of its eigenvectors (the Gauss quadrature weights, summing to 1; zero for
            the Ritz values of blocks after a restart).
        n_restarts: invariant subspaces met (each followed by a fresh start vector orthogonal to
            the basis).
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    eigenvectors: np.ndarray | None
    n_iter: int
    n_hvp: int
    alphas: np.ndarray
    betas: np.ndarray
    ritz_values: np.ndarray
    ritz_weights: np.ndarray
    n_restarts: int = 0

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    def __repr__(self) -> str:
        k = self.eigenvalues.shape[0]
        vec = "" if self.eigenvectors is None else f", eigenvectors {self.eigenvectors.shape}"
        return (f"LanczosResult(k={k}, converged {int(np.sum(self.converged))}/{k}, n_iter={self.n_iter}, "
                f"n_hvp={self.n_hvp}, n_restarts={self.n_restarts}{vec},\n"
                f"  eigenvalues={_summary(self.eigenvalues)},\n  residuals={_summary(self.residuals)})")


def _pick(theta, k, which):
    """Indices (into ascending theta) of the k wanted Ritz values, in reporting order."""
    m = theta.shape[0]
    k = min(k, m)
    if which == "LA":
        return np.arange(m - 1, m - 1 - k, -1)
    if which == "SA":
        return np.arange(k)
    hi = (k + 1) // 2
    lo = k - hi
    idx = list(range(m - 1, m - 1 - hi, -1)) + list(range(lo - 1, -1, -1))
    return np.array(sorted(set(idx), key=lambda i: -theta[i]))


def lanczos(op, k: int = 10, *, which: str = "LA", n: int | None = None, tol: float = 1e-6,
            max_iter: int | None = None, min_iter: int | None = None, check_every: int = 2, v0=None,
            seed: int = 0, n_iter: int | None = None, return_vectors: bool = False, device=None,
            basis_dtype=torch.float64, basis_device=None, reorth: str = "full") -> LanczosResult:
    """Lanczos with full reorthogonalisation on a symmetric operator (MATH.md §6).

    From a Rademacher start vector (or ``v0``), each new vector w = A v_j - beta_{j-1} v_{j-1} -
    alpha_j v_j is reorthogonalised against all previous vectors (classical Gram-Schmidt, repeated
    where a pass leaves less than 1/sqrt(2) of the norm: the DGKS criterion behind "twice is
    enough"), and the off-diagonal beta_j is the norm of w after reorthogonalisation. Every
    ``check_every`` steps the residuals of the wanted Ritz pairs, |beta_j s_{j,i}|, are compared
    with ``tol * max(|theta_i|, eps^(2/3) ||T||)``; the iteration stops when all k are converged
    or at ``max_iter``. With ``n_iter`` given, exactly that many steps are taken (no convergence
    test; the SLQ mode).

    Invariant subspaces (breakdown: beta_j <= 1e-12 max_i ||A v_i|| for a float64 basis, 1e-6 for
    float32, or w numerically in the span of the basis; e.g. a rank-deficient Hessian, or repeated
    eigenvalues): the Ritz values found so far are exact eigenvalues, and the iteration goes on
    from a fresh random vector orthogonalised against the whole basis, with beta_j = 0 (as ARPACK
    does), so that T is block diagonal and multiplicities are found. ``k = n`` therefore returns
    all n eigenvalues (n steps), equal to a dense solver's to rounding.

    Symmetry: an explicit matrix is checked with one random probe (|u^T A v - v^T A u| relative to
    ||A u|| ||v||, tolerance 1e-7, 1e-3 for float32/16 matrices) and refused if non-symmetric; a
    :class:`HessianOperator` or a function is assumed symmetric (not checked).

    Memory: the basis is ``m x n x itemsize`` bytes (m = ``max_iter`` or ``n_iter``; itemsize 8
    for ``basis_dtype=torch.float64``, 4 for float32) on ``basis_device``, plus a few float64
    vectors (n x 8 bytes each) on the operator's device and ``k x n x 8`` for ``return_vectors``.

    Args:
        op: a :class:`HessianOperator`, a symmetric matrix (numpy / torch), or a function
            V (n, k) -> A V (then ``n`` is required).
        k: number of wanted eigenvalues.
        which: "LA" largest algebraic, "SA" smallest algebraic, "BE" both ends (k // 2 from the
            bottom, the rest from the top; as ``scipy.sparse.linalg.eigsh``).
        tol: relative residual tolerance.
        max_iter: most steps (default min(n, max(4k + 40, 100))); at least k.
        min_iter: fewest steps before the first convergence check (default k + 2).
        v0: start vector (n,), normalised here.
        seed: seeds the Rademacher start vector (and restart vectors).
        n_iter: fixed number of steps (overrides tol/max_iter); at least k (n_iter steps give at
            most n_iter Ritz values: ``n_iter < k`` is a ValueError, not a silent NaN).
        return_vectors: also return the (n, k) Ritz vectors.
        device: for a function ``op``, the device of the (float64) vectors it receives (default
            CPU); ignored otherwise.
        basis_dtype: ``torch.float64`` (default) or ``torch.float32``: the stored Krylov basis
            (half the memory and half the memory traffic of the reorthogonalisation, which
            dominates at large n). Alpha, beta, T and the working vectors stay float64; the
            Gram-Schmidt products run in the basis dtype. A float32 basis is orthogonal to ~1e-7,
            so the Ritz values are accurate to ~1e-7 ||A|| instead of ~1e-13 ||A||.
        basis_device: where the basis lives (default: with the vectors, i.e. the operator's
            device); e.g. ``"cpu"`` keeps it off an accelerator while the products run there
            (each step then moves two or three n-vectors between the devices).
        reorth: only "full" here: without reorthogonalisation converged eigenvalues come back as
            spurious copies ("ghosts"); ``reorth="none"`` is offered by :func:`slq` for densities.

    Returns:
        :class:`LanczosResult` (all in float64 numpy).

    Raises:
        ValueError: an unknown ``which``, ``k`` above the dimension, ``n_iter``/``max_iter`` below
            ``k``, a non-symmetric matrix (``op``), a bad ``basis_dtype``/``reorth``.

    Example:
        >>> import numpy as np
        >>> A = np.diag([3.0, 3.0, 1.0, 0.0, 0.0])  # one start vector sees 3 distinct eigenvalues
        >>> res = lanczos(A, k=5)
        >>> res.eigenvalues.round(12) + 0.0, res.n_iter  # a restart at the invariant subspace finds the copies
        (array([3., 3., 1., 0., 0.]), 5)
    """
    if which not in ("LA", "SA", "BE"):
        raise ValueError(f"which: expected 'LA', 'SA' or 'BE', got {which!r}")
    basis_dtype, basis_device, reorth = _check_basis(basis_dtype, basis_device, reorth, allow_none=False,
                                                     where="lanczos")
    f, dim, device = _as_rows_fn(op, n, device, check_symmetric=True)
    k = _check_pos_int(k, "k")
    if k > dim:
        raise ValueError(f"k: asked for {k} eigenvalues of an operator of dimension {dim}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol: expected a positive number, got {tol!r}")
    check_every = _check_pos_int(check_every, "check_every")
    if n_iter is not None:
        m_max = min(_check_pos_int(n_iter, "n_iter"), dim)
        if m_max < k:
            raise ValueError(f"n_iter: {n_iter} Lanczos steps give at most {n_iter} Ritz values, fewer than k={k}; "
                             f"use n_iter >= k")
    else:
        m_max = min(dim, _check_pos_int(max_iter, "max_iter") if max_iter is not None else max(4 * k + 40, 100))
        if m_max < k:
            raise ValueError(f"max_iter: {max_iter} Lanczos steps give at most {max_iter} Ritz values, fewer than "
                             f"k={k}; use max_iter >= k")
    m_min = min(m_max, k + 2 if min_iter is None else _check_pos_int(min_iter, "min_iter"))
    gen = torch.Generator().manual_seed(int(seed))
    if v0 is None:
        v = _rademacher(gen, (dim,), device)
    else:
        v = torch.as_tensor(np.asarray(v0) if not isinstance(v0, torch.Tensor) else v0, dtype=torch.float64)
        v = v.reshape(-1).to(device)
        if v.numel() != dim:
            raise ValueError(f"v0: expected {dim} values, got {v.numel()}")
    if not float(torch.linalg.vector_norm(v)) > 0:
        raise ValueError("v0: must be non-zero")
    eps23 = np.finfo(np.float64).eps ** (2.0 / 3.0)

    def converged(theta, S, beta_last):
        idx = _pick(theta, k, which)
        res = np.abs(beta_last * S[-1, idx])
        bound = tol * np.maximum(np.abs(theta[idx]), eps23 * np.max(np.abs(theta)))
        return idx, res, bound

    def stop(j, a, b):
        m = j + 1
        if n_iter is not None or m < m_min or (m - m_min) % check_every:
            return False
        theta, S = _tridiag_eigh(a, b[:j])
        idx, res, bound = converged(theta, S, b[j])
        return len(idx) == k and bool(np.all(res <= bound))

    kr = _lanczos_runs(f, v[None], m_max, restart=True, gens=[gen], basis_dtype=basis_dtype,
                       basis_device=basis_device, stop=stop)
    m = int(kr.lengths[0])
    alphas, betas = kr.alphas[0, :m], kr.betas[0, :m]
    theta, S = _tridiag_eigh(alphas, betas[:m - 1])
    idx, res, bound = converged(theta, S, betas[m - 1])
    vecs = None
    if return_vectors:
        Y = torch.as_tensor(S[:, idx], dtype=basis_dtype, device=kr.basis.device)
        vecs = (kr.basis[0, :m].T @ Y).to("cpu", torch.float64).numpy()
    return LanczosResult(eigenvalues=theta[idx], residuals=res, converged=res <= bound, eigenvectors=vecs, n_iter=m,
                         n_hvp=kr.n_prod, alphas=alphas.copy(), betas=betas[:m - 1].copy(), ritz_values=theta,
                         ritz_weights=S[0] ** 2, n_restarts=int(kr.restarts[0]))


def hessian_eigenvalues(model: nn.Module, loss_fn: Callable, batch, k: int = 10, *, which: str = "LA",
                        tol: float = 1e-6, max_iter: int | None = None, seed: int = 0, dtype=None,
                        chunk_size: int | None = 128, return_details: bool = False, basis_dtype=torch.float64,
                        basis_device=None, reorth: str = "full"):
    """The k extreme eigenvalues of the Hessian of the loss on ``batch``, by matrix-free Lanczos.

    Full reorthogonalisation, restarts at invariant subspaces and residual-based convergence (see
    :func:`lanczos`); a pair that did not converge within ``max_iter`` steps is reported with a
    ``RuntimeWarning`` (and flagged in the details), not silently. On a rank-deficient Hessian
    the zero eigenvalues come back as zeros (to rounding), never as NaN.

    Args:
        model, loss_fn, batch: as :class:`HessianOperator` (``batch`` may be a list of batches).
        k: how many eigenvalues.
        which: "LA" (largest, default), "SA" (smallest) or "BE" (both ends).
        tol: relative residual tolerance (eigenvalue errors are at most the residual).
        max_iter: most Lanczos steps; seed: start vector; dtype: evaluation dtype.
        return_details: return the :class:`LanczosResult` (residuals, flags, HVP count).
        basis_dtype, basis_device: the stored Krylov basis (see :func:`lanczos`: float32 halves its
            max_iter x n x 8 bytes; "cpu" keeps it off the accelerator).
        reorth: "full" only (``"none"`` is refused: it gives ghost eigenvalues).

    Returns:
        (k,) numpy array, descending (``which="SA"`` too), or the :class:`LanczosResult`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> X = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> ev = hessian_eigenvalues(model, torch.nn.functional.mse_loss, (X, torch.zeros(3, 1)), k=2,
        ...                          dtype=torch.float64)
        >>> ev.round(6)  # (2/3) diag(1, 4, 9)
        array([6.      , 2.666667])
    """
    _check_basis(basis_dtype, basis_device, reorth, allow_none=False, where="hessian_eigenvalues")
    op = HessianOperator(model, loss_fn, batch, dtype=dtype, chunk_size=chunk_size)
    res = lanczos(op, k, which=which, tol=tol, max_iter=max_iter, seed=seed, basis_dtype=basis_dtype,
                  basis_device=basis_device)
    if not res.all_converged:
        warnings.warn(f"hessian_eigenvalues: {int((~res.converged).sum())} of {k} Ritz values did not reach the "
                      f"residual tolerance {tol:g} in {res.n_iter} Lanczos steps (max residual "
                      f"{np.max(res.residuals):.3g}); raise max_iter", RuntimeWarning, stacklevel=2)
    if return_details:
        return res
    return np.sort(res.eigenvalues)[::-1]


def lanczos_lockstep(rows_fn, V0: torch.Tensor, n_iter: int, *, reorth: str = "full", basis_dtype=torch.float64,
                     basis_device=None):
    """R independent Lanczos runs in lockstep for quadrature (one batched product per step).

    ``rows_fn(V)`` maps a (R, n) block whose row r is a vector of run r to the block of products
    (run r may use its own operator, e.g. its own minibatch). The recurrence is
    :func:`_lanczos_runs` (float64 vectors and T; the basis in ``basis_dtype`` on
    ``basis_device``; ``reorth`` "full" or "none"). A run that reaches an invariant subspace
    stops there (its quadrature is then exact; no restart: later blocks would carry zero weight).
    Basis memory: R x n_iter x n x itemsize bytes with ``reorth="full"``, none with ``"none"``
    (then about five float64 (R, n) blocks of working vectors in all).

    Returns the Ritz values (R, m) and weights (R, m) (NaN / 0 where a run stopped early) and the
    number of products.
    """
    basis_dtype, basis_device, reorth = _check_basis(basis_dtype, basis_device, reorth, allow_none=True,
                                                     where="lanczos_lockstep")
    R, n = V0.shape
    kr = _lanczos_runs(rows_fn, V0, n_iter, reorth=reorth, basis_dtype=basis_dtype, basis_device=basis_device)
    m = kr.alphas.shape[1]
    nodes = np.full((R, m), np.nan)
    weights = np.zeros((R, m))
    for r in range(R):
        L = int(kr.lengths[r])
        theta, S = _tridiag_eigh(kr.alphas[r, :L], kr.betas[r, :L - 1])
        nodes[r, :L] = theta
        wr = S[0] ** 2
        weights[r, :L] = wr / wr.sum()
    return nodes, weights, kr.n_prod


# -------------------------------------------------------------------------------------------------
# stochastic Lanczos quadrature and traces


@dataclasses.dataclass(frozen=True, repr=False)
class SpectralDensity:
    """A Hessian spectral density from stochastic Lanczos quadrature.

    Attributes:
        nodes: (R, m) Ritz values of each run (NaN-padded where a run stopped early).
        weights: (R, m) quadrature weights; each run's row sums to 1 (0 where padded).
        n: the operator dimension (total mass of :meth:`pooled`).
        n_hvp: operator products used.
    """

    nodes: np.ndarray
    weights: np.ndarray
    n: int
    n_hvp: int

    @property
    def n_runs(self) -> int:
        return self.nodes.shape[0]

    def pooled(self):
        """(values, masses): all Ritz values with weights scaled so the total mass is n."""
        keep = self.weights > 0
        vals = self.nodes[keep]
        mass = self.weights[keep] * (self.n / self.n_runs)
        return vals, mass

    def density(self, grid, bandwidth: float | None = None) -> np.ndarray:
        """Gaussian-smoothed density on ``grid`` (integrates to n); bandwidth default: 1% of the range."""
        vals, mass = self.pooled()
        grid = np.asarray(grid, dtype=np.float64)
        if bandwidth is None:
            span = float(vals.max() - vals.min()) if vals.size else 1.0
            bandwidth = 0.01 * (span if span > 0 else max(abs(float(vals.max())), 1.0))
        z = (grid[:, None] - vals[None, :]) / bandwidth
        return (np.exp(-0.5 * z * z) * mass[None, :]).sum(axis=1) / (bandwidth * math.sqrt(2 * math.pi))

    def trace(self) -> float:
        """The SLQ estimate of tr(A) (sum of values times masses)."""
        vals, mass = self.pooled()
        return float(np.sum(vals * mass))

    def __repr__(self) -> str:
        vals, _ = self.pooled()
        lengths = (self.weights > 0).sum(axis=1)
        span = f"[{vals.min():.5g}, {vals.max():.5g}]" if vals.size else "[]"
        return (f"SpectralDensity(n={self.n}, n_runs={self.n_runs}, steps per run {int(lengths.min())}-"
                f"{self.nodes.shape[1]}, n_hvp={self.n_hvp},\n  Ritz values in {span}, trace estimate "
                f"{self.trace():.5g})")


def slq(op, n_runs: int = 10, n_iter: int = 100, *, n: int | None = None, seed: int = 0, reorth: str = "full",
        basis_dtype=torch.float64, basis_device=None) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``n_runs`` Lanczos runs of ``n_iter`` steps from Rademacher vectors.

    The runs share one operator and go in lockstep (one batched product per step), or, for a
    function ``r -> operator``, one after another. A run that meets an invariant subspace stops
    there (its quadrature is exact; it is not restarted).

    Cost and memory (N = dimension, R = ``n_runs``, m = ``n_iter``): R m products, plus, with
    ``reorth="full"``, about 2 R m^2 N multiply-adds of Gram-Schmidt (more than the products at
    large N: it streams the basis twice per step, so it runs at memory speed) and a basis of
    R x m x N x itemsize bytes (8 for float64, 4 for float32) on ``basis_device``; with
    ``reorth="none"``, no basis and about 5 R N x 8 bytes of working vectors. For GPT-2 small
    (N = 124M): one float64 vector is 1.0 GB, one float32 vector 0.50 GB; 100 float32 vectors
    (one run of 100 steps) are 49.8 GB, which fits on an 80 GB GPU next to the model, the float64
    basis (99.6 GB) does not, and 8 lockstep runs need 398 GB (float32): use ``basis_device="cpu"``
    (host memory), fewer runs at a time, or ``reorth="none"`` (8 runs: ~5 GB).

    Args:
        op: an operator as in :func:`lanczos`, or a function ``r -> operator`` giving a fresh
            operator per run (e.g. a new minibatch per run, as 2604.19740 does).
        n_runs: number of probes R.
        n_iter: Lanczos steps m per run (at most the dimension).
        n: dimension, when ``op`` is a matrix-free function.
        seed: seeds the start vectors (run r uses a child seed).
        reorth: "full" (default; Gram-Schmidt against the whole basis, the quadrature nodes are
            the Ritz values of an orthonormal basis) or "none" (the plain three-term recurrence:
            the basis loses orthogonality once Ritz values converge, and converged eigenvalues
            reappear as ghost copies that share their weight, so the density, the trace and the
            SLQ sharpness dimension barely move while single Ritz values are unreliable: for
            densities only).
        basis_dtype: ``torch.float64`` (default) or ``torch.float32`` (half the memory and the
            Gram-Schmidt traffic; Ritz values to ~1e-7 ||A||).
        basis_device: where the bases live (default: the operator's device), e.g. ``"cpu"``.

    Returns:
        :class:`SpectralDensity`.

    Example:
        >>> import numpy as np
        >>> sd = slq(np.diag([1.0, 2.0, 3.0, 4.0]), n_runs=3, n_iter=4)
        >>> round(sd.trace(), 10), round(float(sd.pooled()[1].sum()), 10)
        (10.0, 4.0)
    """
    n_runs = _check_pos_int(n_runs, "n_runs")
    n_iter = _check_pos_int(n_iter, "n_iter")
    basis_dtype, basis_device, reorth = _check_basis(basis_dtype, basis_device, reorth, allow_none=True, where="slq")
    per_run = callable(op) and not isinstance(op, (HessianOperator, np.ndarray, torch.Tensor)) and n is None
    seeds = np.random.SeedSequence(int(seed)).generate_state(n_runs)
    kw = dict(reorth=reorth, basis_dtype=basis_dtype, basis_device=basis_device)
    if not per_run:  # one operator: all runs in lockstep, one batched product per step
        f, dim, device = _as_rows_fn(op, n, check_symmetric=True)
        V0 = torch.stack([_rademacher(torch.Generator().manual_seed(int(sd)), (dim,), device) for sd in seeds])
        nodes, weights, total = lanczos_lockstep(f, V0, n_iter, **kw)
        return SpectralDensity(nodes=nodes, weights=weights, n=int(dim), n_hvp=total)
    rows, dim, total = [], None, 0
    for r in range(n_runs):
        f, d, device = _as_rows_fn(op(r), None, check_symmetric=True)
        if dim is not None and d != dim:
            raise ValueError(f"op: operator {r} has dimension {d}, operator 0 has {dim}")
        dim = d
        v = _rademacher(torch.Generator().manual_seed(int(seeds[r])), (1, dim), device)
        nd, wt, cnt = lanczos_lockstep(f, v, n_iter, **kw)
        rows.append((nd[0], wt[0]))
        total += cnt
    m = max(a.size for a, _ in rows)
    N = np.full((n_runs, m), np.nan)
    W = np.zeros((n_runs, m))
    for r, (a, b) in enumerate(rows):
        N[r, :a.size] = a
        W[r, :b.size] = b
    return SpectralDensity(nodes=N, weights=W, n=int(dim), n_hvp=total)


def _probe_block(op, n_probes, seed, n=None):
    f, dim, device = _as_rows_fn(op, n)
    gen = torch.Generator().manual_seed(int(seed))
    return f, dim, device, gen


def hutchinson_trace(op, n_probes: int = 64, *, n: int | None = None, seed: int = 0) -> float:
    """Hutchinson's estimate tr(A) ~ (1/s) sum_i z_i^T A z_i with s Rademacher probes in one batched product."""
    n_probes = _check_pos_int(n_probes, "n_probes")
    f, dim, device, gen = _probe_block(op, n_probes, seed, n)
    Z = _rademacher(gen, (n_probes, dim), device)
    AZ = f(Z)
    return float((Z * AZ).sum() / n_probes)


def hutchpp_trace(op, n_probes: int = 66, *, n: int | None = None, seed: int = 0) -> float:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): tr(A) with n_probes products in total.

    A third of the budget sketches the top range Q (A S, orthonormalised), its trace tr(Q^T A Q)
    is exact, and Hutchinson with the remaining third estimates the trace of the deflated rest
    (I - QQ^T) A (I - QQ^T). Exact when rank(A) <= n_probes / 3.
    """
    n_probes = _check_pos_int(n_probes, "n_probes", 3)
    f, dim, device, gen = _probe_block(op, n_probes, seed, n)
    s = n_probes // 3
    S = _rademacher(gen, (s, dim), device)
    G = _rademacher(gen, (n_probes - 2 * s, dim), device)
    Q, _ = torch.linalg.qr(f(S).T)  # (dim, s)
    Q = Q[:, :min(s, dim)]
    AQ = f(Q.T.contiguous())  # rows: (A q_i)^T
    t_top = float((Q.T * AQ).sum())
    Gp = G - (G @ Q) @ Q.T
    AG = f(Gp)
    t_rest = float((Gp * AG).sum() / G.shape[0])
    return t_top + t_rest
