"""Matrix-free curvature of a loss over a ``torch.nn.Module`` (MATH.md §6) (private module).

Public names (re-exported by :mod:`rdsim.torch`): :class:`HessianOperator`, :func:`dense_hessian`,
:func:`hessian_eigenvalues`, :func:`lanczos`, :class:`LanczosResult`, :func:`slq`,
:class:`SpectralDensity`, :func:`hutchinson_trace`, :func:`hutchpp_trace`.

Policies:

* HVPs are forward-over-reverse, ``jvp(grad(L))(w; v)``, batched over columns with ``vmap`` in
  chunks of ``chunk_size`` columns (memory grows linearly with it).
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
from torch.func import functional_call, grad, jvp, vmap

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
        data: one batch ``(inputs, targets)`` or an iterable of such batches (a list, a DataLoader);
            batches are moved to the device once, at construction.
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
        self.device = torch.device(named[0][1].device if device is None else device)
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

        if is_pair(data) and isinstance(data[0], (torch.Tensor, np.ndarray)):
            raw = [data]
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
        """H_b V for a (k, n) block of rows V (forward-over-reverse, vmapped in chunks)."""
        w = self.w
        dual_t = y.is_floating_point()
        ty = torch.zeros_like(y) if dual_t else None

        def g(ww, yy):
            return grad(self.loss_at)(ww, X, yy)

        def one(v):
            if dual_t:  # floating targets enter as primals with zero tangents (see OptimizerMap._push)
                return jvp(g, (w, y), (v, ty))[1]
            return jvp(lambda ww: g(ww, y), (w,), (v,))[1]

        k = V.shape[0]
        cs = self.chunk_size or k
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
            parts = [vmap(one)(V[s:s + cs]) for s in range(0, k, cs)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _rows_multi(self, V: torch.Tensor, Xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Row r of V times the Hessian on batch (Xs[r], ys[r]) (equal-size batches), vmapped jointly."""
        w = self.w
        dual_t = ys.is_floating_point()

        def one(v, X, y):
            def g(ww, yy):
                return grad(self.loss_at)(ww, X, yy)
            if dual_t:
                return jvp(g, (w, y), (v, torch.zeros_like(y)))[1]
            return jvp(lambda ww: g(ww, y), (w,), (v,))[1]

        k = V.shape[0]
        cs = self.chunk_size or k
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
            parts = [vmap(one)(V[s:s + cs], Xs[s:s + cs], ys[s:s + cs]) for s in range(0, k, cs)]
        self.n_hvp += k
        return parts[0] if len(parts) == 1 else torch.cat(parts)

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
        new = copy.copy(self)
        new.batches = self._load_batches((inputs, targets))
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


def _as_rows_fn(op, n=None, device=None):
    """(rows (k, n) float64 -> H rows, n, device) for a HessianOperator, a matrix or a callable
    (whose vectors live on ``device``, default CPU)."""
    if isinstance(op, HessianOperator):
        def f(R):
            return op._rows(R.to(op.dtype)).to(torch.float64)
        return f, op.n_params, op.device
    if isinstance(op, (np.ndarray, torch.Tensor)):
        A = torch.as_tensor(op, dtype=torch.float64)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"op: expected a square matrix, got shape {tuple(A.shape)}")
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
# Lanczos


@dataclasses.dataclass(frozen=True)
class LanczosResult:
    """Outcome of :func:`lanczos` / :func:`hessian_eigenvalues` (``return_details=True``).

    Attributes:
        eigenvalues: (k,) the wanted Ritz values (descending for "LA" and "BE", ascending for "SA").
        residuals: (k,) ||A y - theta y|| of each Ritz pair (|beta_m s_m|, exact with full
            reorthogonalisation up to rounding).
        converged: (k,) residual <= tol * max(|theta|, eps^(2/3) ||T||).
        eigenvectors: (n, k) Ritz vectors (float64) or None.
        n_iter: Lanczos steps taken; n_hvp: operator products used.
        alphas, betas: the tridiagonal T (diagonal (m,), off-diagonal (m - 1,)).
        ritz_values, ritz_weights: all eigenvalues of T (ascending) and the squared first
            components of its eigenvectors (the Gauss quadrature weights, summing to 1).
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

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))


#: DGKS criterion: a second Gram-Schmidt pass when the first leaves less than 1/sqrt(2) of the norm
_DGKS = 0.5 ** 0.5


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
            seed: int = 0, n_iter: int | None = None, return_vectors: bool = False, device=None) -> LanczosResult:
    """Lanczos with full reorthogonalisation on a symmetric operator (MATH.md §6).

    From a Rademacher start vector (or ``v0``), the new vector is reorthogonalised against all
    previous vectors every step (classical Gram-Schmidt, repeated once when the first pass leaves
    less than 1/sqrt(2) of its norm: the DGKS criterion behind "twice is enough"), and the
    off-diagonal beta_j is the norm of the new vector after reorthogonalisation. Every
    ``check_every`` steps the residuals of the wanted Ritz pairs, |beta_j s_{j,i}|, are compared
    with ``tol * max(|theta_i|, eps^(2/3) ||T||)``; the iteration stops when all k are converged,
    at an invariant subspace (then the Ritz values are exact eigenvalues), or at ``max_iter``.
    With ``n_iter`` given, exactly that many steps are taken (no convergence test; the SLQ mode).

    Args:
        op: a :class:`HessianOperator`, a symmetric matrix (numpy / torch), or a function
            V (n, k) -> A V (then ``n`` is required).
        k: number of wanted eigenvalues.
        which: "LA" largest algebraic, "SA" smallest algebraic, "BE" both ends (k // 2 from the
            bottom, the rest from the top; as ``scipy.sparse.linalg.eigsh``).
        tol: relative residual tolerance.
        max_iter: most steps (default min(n, max(4k + 40, 100))).
        min_iter: fewest steps before the first convergence check (default k + 2).
        v0: start vector (n,), normalised here.
        seed: seeds the Rademacher start vector.
        n_iter: fixed number of steps (overrides tol/max_iter).
        return_vectors: also return the (n, k) Ritz vectors.
        device: for a function ``op``, the device of the (float64) vectors it receives and of the
            Krylov basis (default CPU); ignored otherwise.

    Returns:
        :class:`LanczosResult` (all in float64 numpy).
    """
    if which not in ("LA", "SA", "BE"):
        raise ValueError(f"which: expected 'LA', 'SA' or 'BE', got {which!r}")
    f, dim, device = _as_rows_fn(op, n, device)
    k = _check_pos_int(k, "k")
    if k > dim:
        raise ValueError(f"k: asked for {k} eigenvalues of an operator of dimension {dim}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol: expected a positive number, got {tol!r}")
    check_every = _check_pos_int(check_every, "check_every")
    if n_iter is not None:
        m_max = min(_check_pos_int(n_iter, "n_iter"), dim)
    else:
        m_max = min(dim, _check_pos_int(max_iter, "max_iter") if max_iter is not None else max(4 * k + 40, 100))
    m_min = min(m_max, k + 2 if min_iter is None else _check_pos_int(min_iter, "min_iter"))
    if v0 is None:
        gen = torch.Generator().manual_seed(int(seed))
        v = _rademacher(gen, (dim,), device)
    else:
        v = torch.as_tensor(np.asarray(v0) if not isinstance(v0, torch.Tensor) else v0, dtype=torch.float64)
        v = v.reshape(-1).to(device)
        if v.numel() != dim:
            raise ValueError(f"v0: expected {dim} values, got {v.numel()}")
    nv = torch.linalg.vector_norm(v)
    if not float(nv) > 0:
        raise ValueError("v0: must be non-zero")
    v = v / nv
    basis = torch.empty((m_max, dim), dtype=torch.float64, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    n_hvp = 0
    beta_last = 0.0
    eps23 = np.finfo(np.float64).eps ** (2.0 / 3.0)
    theta = S = None
    for j in range(m_max):
        basis[j] = v
        w = f(v[None])[0]
        n_hvp += 1
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError("lanczos: the operator returned non-finite values")
        a = float(torch.dot(w, v))
        alphas.append(a)
        w = w - a * v
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        B = basis[:j + 1]
        before = torch.linalg.vector_norm(w)
        w = w - B.T @ (B @ w)
        if bool(torch.linalg.vector_norm(w) < _DGKS * before):  # second pass only where the first cancelled
            w = w - B.T @ (B @ w)
        beta_last = float(torch.linalg.vector_norm(w))
        m = j + 1
        scale = max(abs(x) for x in alphas + betas) if (alphas or betas) else 1.0
        invariant = beta_last <= 1e-12 * max(scale, 1e-300)
        done = invariant or m == m_max
        if not done and n_iter is None and m >= m_min and (m - m_min) % check_every == 0:
            theta, S = _tridiag_eigh(alphas, betas)
            idx = _pick(theta, k, which)
            res = np.abs(beta_last * S[-1, idx])
            bound = tol * np.maximum(np.abs(theta[idx]), eps23 * np.max(np.abs(theta)))
            if len(idx) == k and np.all(res <= bound):
                done = True
        if done:
            break
        betas.append(beta_last)
        v = w / beta_last
    m = len(alphas)
    theta, S = _tridiag_eigh(alphas, betas[:m - 1])
    if invariant:
        beta_last = 0.0
    idx = _pick(theta, k, which)
    res = np.abs(beta_last * S[-1, idx])
    bound = tol * np.maximum(np.abs(theta[idx]), eps23 * np.max(np.abs(theta)))
    vecs = None
    if return_vectors:
        Y = torch.as_tensor(S[:, idx], dtype=torch.float64, device=device)
        vecs = (basis[:m].T @ Y).cpu().numpy()
    ev = theta[idx]
    if len(idx) < k:  # fewer Ritz values than wanted (an invariant subspace smaller than k)
        pad = k - len(idx)
        ev = np.concatenate([ev, np.full(pad, np.nan)])
        res = np.concatenate([res, np.full(pad, np.inf)])
        bound = np.concatenate([bound, np.zeros(pad)])
    return LanczosResult(eigenvalues=ev, residuals=res, converged=res <= bound, eigenvectors=vecs, n_iter=m,
                         n_hvp=n_hvp, alphas=np.array(alphas), betas=np.array(betas[:m - 1]), ritz_values=theta,
                         ritz_weights=S[0] ** 2)


def _tridiag_eigh(alphas, betas):
    from scipy.linalg import eigh_tridiagonal

    a = np.asarray(alphas, dtype=np.float64)
    if a.size == 1:
        return a.copy(), np.ones((1, 1))
    return eigh_tridiagonal(a, np.asarray(betas, dtype=np.float64))


def hessian_eigenvalues(model: nn.Module, loss_fn: Callable, batch, k: int = 10, *, which: str = "LA",
                        tol: float = 1e-6, max_iter: int | None = None, seed: int = 0, dtype=None,
                        chunk_size: int | None = 128, return_details: bool = False):
    """The k extreme eigenvalues of the Hessian of the loss on ``batch``, by matrix-free Lanczos.

    Full reorthogonalisation and residual-based convergence (see :func:`lanczos`); a pair that did
    not converge within ``max_iter`` steps is reported with a ``RuntimeWarning`` (and flagged in
    the details), not silently.

    Args:
        model, loss_fn, batch: as :class:`HessianOperator` (``batch`` may be a list of batches).
        k: how many eigenvalues.
        which: "LA" (largest, default), "SA" (smallest) or "BE" (both ends).
        tol: relative residual tolerance (eigenvalue errors are at most the residual).
        max_iter: most Lanczos steps; seed: start vector; dtype: evaluation dtype.
        return_details: return the :class:`LanczosResult` (residuals, flags, HVP count).

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
    op = HessianOperator(model, loss_fn, batch, dtype=dtype, chunk_size=chunk_size)
    res = lanczos(op, k, which=which, tol=tol, max_iter=max_iter, seed=seed)
    if not res.all_converged:
        warnings.warn(f"hessian_eigenvalues: {int((~res.converged).sum())} of {k} Ritz values did not reach the "
                      f"residual tolerance {tol:g} in {res.n_iter} Lanczos steps (max residual "
                      f"{np.max(res.residuals):.3g}); raise max_iter", RuntimeWarning, stacklevel=2)
    if return_details:
        return res
    return np.sort(res.eigenvalues)[::-1]


def lanczos_lockstep(rows_fn, V0: torch.Tensor, n_iter: int):
    """R independent Lanczos recurrences run in lockstep (one batched product per step).

    ``rows_fn(V)`` maps a (R, n) block whose row r is a vector of run r to the block of products
    (run r may use its own operator, e.g. its own minibatch). Full reorthogonalisation per run (a
    second pass where DGKS asks for it, as in :func:`lanczos`), beta = norm after
    reorthogonalisation, float64. A run that reaches an invariant subspace
    stops growing (its later alphas/betas are masked). Returns the Ritz values (R, m) and weights
    (R, m) (NaN / 0 where a run stopped early) and the number of products.
    """
    R, n = V0.shape
    m = min(int(n_iter), n)
    V = V0.to(torch.float64)
    V = V / torch.linalg.vector_norm(V, dim=1, keepdim=True)
    basis = torch.zeros((R, m, n), dtype=torch.float64, device=V.device)
    A = torch.zeros((R, m), dtype=torch.float64)
    B = torch.zeros((R, m), dtype=torch.float64)
    alive = torch.ones(R, dtype=torch.bool)
    length = torch.full((R,), m, dtype=torch.long)
    prev_beta = torch.zeros(R, dtype=torch.float64, device=V.device)
    n_prod = 0
    n_second = [0]
    for j in range(m):
        basis[:, j] = V
        W = rows_fn(V).to(torch.float64)
        n_prod += int(alive.sum())
        if not bool(torch.isfinite(W).all()):
            raise FloatingPointError("lanczos: the operator returned non-finite values")
        a = (W * V).sum(dim=1)
        W = W - a[:, None] * V
        if j > 0:
            W = W - prev_beta[:, None] * basis[:, j - 1]
        Bj = basis[:, :j + 1]
        # classical Gram-Schmidt against the whole basis; a second pass only where the first one
        # cancelled much of the vector (the DGKS criterion: norm fell below 1/sqrt(2) of itself)
        before = torch.linalg.vector_norm(W, dim=1)
        W = W - torch.einsum("rjn,rj->rn", Bj, torch.einsum("rjn,rn->rj", Bj, W))
        beta = torch.linalg.vector_norm(W, dim=1)
        again = beta < _DGKS * before
        if bool(again.any()):
            idx = again.nonzero().squeeze(1)
            Ba, Wa = Bj[idx], W[idx]
            W[idx] = Wa - torch.einsum("rjn,rj->rn", Ba, torch.einsum("rjn,rn->rj", Ba, Wa))
            beta = torch.linalg.vector_norm(W, dim=1)
            n_second[0] += int(idx.numel())
        A[:, j] = a.cpu()
        B[:, j] = beta.cpu()
        scale = torch.maximum(A[:, :j + 1].abs().max(dim=1).values, B[:, :j + 1].abs().max(dim=1).values)
        stop = alive & (B[:, j] <= 1e-12 * torch.clamp(scale, min=1e-300))
        length[stop] = j + 1
        alive &= ~stop
        if j == m - 1 or not bool(alive.any()):
            break
        safe = torch.where(beta > 0, beta, torch.ones_like(beta))
        V = W / safe[:, None]
        prev_beta = beta
    nodes = np.full((R, m), np.nan)
    weights = np.zeros((R, m))
    for r in range(R):
        L = int(length[r])
        theta, S = _tridiag_eigh(A[r, :L].numpy(), B[r, :L - 1].numpy())
        nodes[r, :L] = theta
        wr = S[0] ** 2
        weights[r, :L] = wr / wr.sum()
    return nodes, weights, n_prod


# -------------------------------------------------------------------------------------------------
# stochastic Lanczos quadrature and traces


@dataclasses.dataclass(frozen=True)
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


def slq(op, n_runs: int = 10, n_iter: int = 100, *, n: int | None = None, seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``n_runs`` Lanczos runs of ``n_iter`` steps from Rademacher vectors.

    Args:
        op: an operator as in :func:`lanczos`, or a function ``r -> operator`` giving a fresh
            operator per run (e.g. a new minibatch per run, as 2604.19740 does).
        n_runs: number of probes R.
        n_iter: Lanczos steps m per run (at most the dimension).
        n: dimension, when ``op`` is a matrix-free function.
        seed: seeds the start vectors (run r uses a child seed).

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
    per_run = callable(op) and not isinstance(op, (HessianOperator, np.ndarray, torch.Tensor)) and n is None
    seeds = np.random.SeedSequence(int(seed)).generate_state(n_runs)
    if not per_run:  # one operator: all runs in lockstep, one batched product per step
        f, dim, device = _as_rows_fn(op, n)
        V0 = torch.stack([_rademacher(torch.Generator().manual_seed(int(sd)), (dim,), device) for sd in seeds])
        nodes, weights, total = lanczos_lockstep(f, V0, n_iter)
        return SpectralDensity(nodes=nodes, weights=weights, n=int(dim), n_hvp=total)
    nodes, weights, total, dim = [], [], 0, None
    for r in range(n_runs):
        opr = op(r) if per_run else op
        res = lanczos(opr, 1, n=n, n_iter=n_iter, seed=int(seeds[r]))
        if dim is None:
            dim = _as_rows_fn(opr, n)[1]
        nodes.append(res.ritz_values)
        weights.append(res.ritz_weights)
        total += res.n_hvp
    m = max(len(x) for x in nodes)
    N = np.full((n_runs, m), np.nan)
    W = np.zeros((n_runs, m))
    for r, (a, b) in enumerate(zip(nodes, weights)):
        N[r, :len(a)] = a
        W[r, :len(b)] = b / b.sum()
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
