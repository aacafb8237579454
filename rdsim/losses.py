"""Toy losses with analytic per-sample gradients and Hessians (numba backend).

Each loss has ``dim`` parameters and ``n`` samples, so that minibatches make sense; the mean loss
over a minibatch B is L_B(x) = (1/|B|) sum_{i in B} l_i(x). Kernels (numba, allocation-free,
used by :func:`rdsim.optimizer_map`):

* ``value(x, data, idx)``, ``grad(x, data, idx, out)``, ``hvp(x, data, idx, V, out)`` where
  ``idx`` is a float array of sample indices (length 0 = the full batch) and ``hvp`` writes
  H_B(x) @ V for a (dim, k) block V.

Python helpers ``loss.value(x, idx=None)``, ``loss.grad(x, idx=None)``, ``loss.hessian(x, idx=None)``
evaluate the same kernels.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._config import NUMBA_OPTIONS
from ._linalg import matmul_into
from ._validate import check_array, check_real

__all__ = ["ToyLoss", "quadratic", "least_squares", "dln", "cosine_landscape"]

_jit = nb.njit(**NUMBA_OPTIONS)


class ToyLoss:
    """A loss with numba kernels for value, per-batch gradient and Hessian-vector products.

    Attributes:
        name: label. dim: number of parameters. n: number of samples. data: tuple of arrays
        passed to the kernels. x0: a default initial parameter vector (or None).
    """

    def __init__(self, name, dim, n, data, value_k, grad_k, hvp_k, x0=None, info=None):
        self.name, self.dim, self.n, self.data = name, int(dim), int(n), data
        self._value, self._grad, self._hvp = value_k, grad_k, hvp_k
        self.x0 = None if x0 is None else np.ascontiguousarray(x0, dtype=np.float64)
        self.info = info or {}

    def _idx(self, idx):
        if idx is None:
            return np.empty(0)
        idx = check_array("idx", idx).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n or np.any(idx != np.floor(idx))):
            raise ValueError(f"idx: sample indices must be integers in [0, {self.n})")
        return idx

    def _x(self, x):
        x = check_array("x", x, finite=False)
        if x.shape != (self.dim,):
            raise ValueError(f"x: expected shape ({self.dim},), got {x.shape}")
        return x

    def value(self, x, idx=None) -> float:
        """Mean loss over the samples ``idx`` (None: all)."""
        return float(self._value(self._x(x), self.data, self._idx(idx)))

    def grad(self, x, idx=None) -> np.ndarray:
        out = np.empty(self.dim)
        self._grad(self._x(x), self.data, self._idx(idx), out)
        return out

    def hvp(self, x, V, idx=None) -> np.ndarray:
        V = check_array("V", V, ndim=(1, 2), finite=False)
        if V.shape[0] != self.dim or V.size == 0:
            raise ValueError(f"V: expected shape ({self.dim},) or ({self.dim}, k) with k >= 1, got {V.shape}")
        vec = V.ndim == 1
        V2 = V.reshape(self.dim, -1)
        out = np.empty_like(V2)
        self._hvp(self._x(x), self.data, self._idx(idx), np.ascontiguousarray(V2), out)
        return out[:, 0] if vec else out

    def hessian(self, x, idx=None) -> np.ndarray:
        """Dense Hessian of the minibatch loss (dim, dim)."""
        return self.hvp(x, np.eye(self.dim), idx)

    def __repr__(self):
        return f"ToyLoss({self.name!r}, dim={self.dim}, n={self.n})"


# --- quadratic ---------------------------------------------------------------------------------

@_jit
def _quad_value(x, data, idx):
    A = data[0]
    return 0.5 * np.dot(x, A @ x)


@_jit
def _quad_grad(x, data, idx, out):
    A = data[0]
    d = x.shape[0]
    for i in range(d):
        s = 0.0
        for j in range(d):
            s += A[i, j] * x[j]
        out[i] = s


@_jit
def _quad_hvp(x, data, idx, V, out):
    matmul_into(data[0], V, out)


def quadratic(A) -> ToyLoss:
    """L(x) = 1/2 x^T A x (one "sample"; A symmetric).

    GD with step eta is the linear map x -> (I - eta A) x: its Lyapunov spectrum is the sorted
    log|1 - eta alpha_i|, alpha_i = eig(A) (MATH.md §7).
    """
    A = check_array("A", A, finite=False)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"A: expected a non-empty square matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError("A: must be finite")
    if not np.allclose(A, A.T, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(A).max())):
        raise ValueError("A: expected a symmetric matrix")
    d = A.shape[0]
    return ToyLoss("quadratic", d, 1, (A,), _quad_value, _quad_grad, _quad_hvp, x0=np.ones(d),
                   info={"eigenvalues": np.linalg.eigvalsh(A)})


# --- least squares -----------------------------------------------------------------------------

@_jit
def _ls_value(x, data, idx):
    X, y = data[0], data[1]
    n = X.shape[0]
    m = idx.shape[0]
    nb_ = n if m == 0 else m
    s = 0.0
    for r in range(nb_):
        i = r if m == 0 else int(idx[r])
        res = np.dot(X[i], x) - y[i]
        s += res * res
    return 0.5 * s / nb_


@_jit
def _ls_grad(x, data, idx, out):
    X, y = data[0], data[1]
    n, d = X.shape
    m = idx.shape[0]
    nb_ = n if m == 0 else m
    for j in range(d):
        out[j] = 0.0
    for r in range(nb_):
        i = r if m == 0 else int(idx[r])
        res = -y[i]
        for j in range(d):
            res += X[i, j] * x[j]
        for j in range(d):
            out[j] += res * X[i, j]
    for j in range(d):
        out[j] /= nb_


@_jit
def _ls_hvp(x, data, idx, V, out):
    X = data[0]
    n, d = X.shape
    k = V.shape[1]
    m = idx.shape[0]
    nb_ = n if m == 0 else m
    s = np.empty(k)
    for j in range(d):
        for c in range(k):
            out[j, c] = 0.0
    for r in range(nb_):
        i = r if m == 0 else int(idx[r])
        for c in range(k):
            s[c] = 0.0
        for j in range(d):
            xij = X[i, j]
            for c in range(k):
                s[c] += xij * V[j, c]
        for j in range(d):
            xij = X[i, j] / nb_
            for c in range(k):
                out[j, c] += xij * s[c]


def _check_Xy(X, y):
    X = check_array("X", X, finite=False)
    if X.ndim != 2:
        raise ValueError(f"X: expected a 2-D array (n, p), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X: expected at least one sample and one feature, got shape {X.shape}")
    y = check_array("y", y, finite=False)
    if y.ndim > 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise ValueError(f"y: expected {X.shape[0]} scalar targets, shape ({X.shape[0]},), got shape {y.shape}")
    y = y.reshape(-1)
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"y: expected {X.shape[0]} targets (one per row of X), got {y.shape[0]}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X: must be finite")
    if not np.all(np.isfinite(y)):
        raise ValueError("y: must be finite")
    return X, y


def least_squares(X, y) -> ToyLoss:
    """L(w) = (1/2n) ||X w - y||^2; sample i is row i. H_B = X_B^T X_B / |B| (constant in w)."""
    X, y = _check_Xy(X, y)
    n, p = X.shape
    return ToyLoss("least_squares", p, n, (X, y), _ls_value, _ls_grad, _ls_hvp, x0=np.zeros(p),
                   info={"eigenvalues": np.linalg.eigvalsh(X.T @ X / n)})


# --- diagonal linear network ---------------------------------------------------------------------

@_jit
def _dln_beta(x, p, depth, beta):
    for j in range(p):
        b = 1.0
        for l in range(depth):
            b *= x[l * p + j]
        beta[j] = b


@_jit
def _dln_value(x, data, idx):
    p = data[0].shape[1]
    depth = x.shape[0] // p
    beta = np.empty(p)
    _dln_beta(x, p, depth, beta)
    return _ls_value(beta, data, idx)


@_jit
def _dln_resid_grad(x, data, idx, beta, gb):
    """beta and the gradient of L_B with respect to beta: gb = X_B^T (X_B beta - y_B) / |B|."""
    X = data[0]
    n, p = X.shape
    depth = x.shape[0] // p
    _dln_beta(x, p, depth, beta)
    _ls_grad(beta, data, idx, gb)


@_jit
def _prod_except(x, p, depth, j, skip1, skip2):
    v = 1.0
    for l in range(depth):
        if l != skip1 and l != skip2:
            v *= x[l * p + j]
    return v


@_jit
def _dln_grad(x, data, idx, out):
    p = data[0].shape[1]
    depth = x.shape[0] // p
    beta = np.empty(p)
    gb = np.empty(p)
    _dln_resid_grad(x, data, idx, beta, gb)
    for l in range(depth):
        for j in range(p):
            out[l * p + j] = gb[j] * _prod_except(x, p, depth, j, l, -1)


@_jit
def _dln_hvp(x, data, idx, V, out):
    # H = J^T H_beta J + sum_j gb_j d^2 beta_j / dw dw, J = d beta / dw (diagonal blocks P_l)
    X = data[0]
    p = X.shape[1]
    depth = x.shape[0] // p
    k = V.shape[1]
    beta = np.empty(p)
    gb = np.empty(p)
    _dln_resid_grad(x, data, idx, beta, gb)
    U = np.zeros((p, k))  # J V in beta space
    for l in range(depth):
        for j in range(p):
            P = _prod_except(x, p, depth, j, l, -1)
            for c in range(k):
                U[j, c] += P * V[l * p + j, c]
    HU = np.empty((p, k))
    _ls_hvp(beta, data, idx, U, HU)
    for l in range(depth):
        for j in range(p):
            P = _prod_except(x, p, depth, j, l, -1)
            for c in range(k):
                out[l * p + j, c] = P * HU[j, c]
            for m in range(depth):
                if m != l:
                    Q = gb[j] * _prod_except(x, p, depth, j, l, m)
                    for c in range(k):
                        out[l * p + j, c] += Q * V[m * p + j, c]


def dln(X, y, depth: int = 2, init=None) -> ToyLoss:
    """Diagonal linear network: x = concatenate(w_1, ..., w_depth), beta = w_1 * ... * w_depth,
    L = (1/2n) ||X beta - y||^2 (arXiv 2412.17613; Even et al. 2023).

    The scalar model (X = [[1]], y = [y], depth 2) is the uv model L = 1/2 (uv - y)^2 of
    MATH.md §7. ``init`` is the default initial state (default: every w_l = 1/sqrt(p)... scaled
    so that beta is small): a float sets all entries to that value.
    """
    X, y = _check_Xy(X, y)
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth: expected a positive integer, got {depth!r}")
    n, p = X.shape
    dim = depth * p
    if init is None:
        x0 = np.full(dim, 0.1)
    elif np.ndim(init) == 0 and not isinstance(init, (str, bytes)):
        x0 = np.full(dim, check_real("init", init))
    else:
        x0 = check_array("init", init)
        if x0.shape != (dim,):
            raise ValueError(f"init: expected a number or shape ({dim},), got {x0.shape}")
    return ToyLoss(f"dln(depth={depth})", dim, n, (X, y), _dln_value, _dln_grad, _dln_hvp, x0=x0,
                   info={"depth": int(depth), "p": p})


# --- cosine landscape ----------------------------------------------------------------------------

@_jit
def _cos_value(x, data, idx):
    A, kk = data[0][0], data[0][1]
    pc = 1.0
    for i in range(x.shape[0]):
        pc *= np.cos(kk * x[i])
    return 0.5 * np.dot(x, x) - A * pc


@_jit
def _cos_grad(x, data, idx, out):
    A, kk = data[0][0], data[0][1]
    d = x.shape[0]
    for i in range(d):
        pc = 1.0
        for j in range(d):
            if j != i:
                pc *= np.cos(kk * x[j])
        out[i] = x[i] + A * kk * np.sin(kk * x[i]) * pc


@_jit
def _cos_hvp(x, data, idx, V, out):
    A, kk = data[0][0], data[0][1]
    d, k = V.shape
    for i in range(d):
        for c in range(k):
            out[i, c] = V[i, c]
        for j in range(d):
            pc = 1.0
            for m in range(d):
                if m != i and m != j:
                    pc *= np.cos(kk * x[m])
            if i == j:
                h = A * kk * kk * np.cos(kk * x[i]) * pc
            else:
                h = -A * kk * kk * np.sin(kk * x[i]) * np.sin(kk * x[j]) * pc
            for c in range(k):
                out[i, c] += h * V[j, c]


def cosine_landscape(A: float = 2.0, k: float = 4.0, dim: int = 2) -> ToyLoss:
    """L(x) = 1/2 ||x||^2 - A prod_i cos(k x_i) (arXiv 2604.19740, Fig. 6; one "sample")."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim: expected a positive integer, got {dim!r}")
    A, k = check_real("A", A), check_real("k", k)
    return ToyLoss("cosine_landscape", int(dim), 1, (np.array([float(A), float(k)]),), _cos_value,
                   _cos_grad, _cos_hvp, x0=np.full(int(dim), 0.3))
