"""Optimizers on toy losses as numba random maps (MATH.md §1): ``rdsim.optimizer_map``.

The state is the full optimizer state, (x), (x, m) or (x, m, v); the noise xi_t is the minibatch
index set B_t (as floats), preceded for Adam by the step counter t (1, 2, ...), which makes the
bias correction part of the driving sequence. The tangent maps are exact:

* GD / SGD:   Df = I - eta H_B
* momentum:   [[I - eta H, -eta beta I], [H, beta I]] in (x, m) order
* Adam:       the full 3d x 3d derivative of the update through m and v; with
  ``tangent="frozen"`` the labelled approximation I - eta P^{-1} H (P = diag(sqrt(v_hat) + eps)),
  a d-dimensional tangent space.
"""

from __future__ import annotations

import functools

import numba as nb
import numpy as np

from ._config import NUMBA_OPTIONS
from ._systems import AbstractNumbaSystem
from .losses import ToyLoss
from .optim import OptimizerSpec, noise_sampler

__all__ = ["OptimizerMap", "optimizer_map"]

# hyperparameter vector layout (float64 array passed to the kernels)
LR, BETA, BETA1, BETA2, EPS, WD, DECOUPLED = range(7)


def _hyper(spec: OptimizerSpec) -> np.ndarray:
    return np.array([spec.lr, spec.beta, spec.beta1, spec.beta2, spec.eps, spec.weight_decay,
                     1.0 if spec.decoupled else 0.0])


# The kernels are cached per (loss kernels, d): hyperparameters and data are runtime arguments, so
# every spec of one kind on one loss type shares one compiled advance and hence one compiled QR
# engine (without the cache each optimizer map recompiled the engine, ~2-3 s per grid point).
@functools.lru_cache(maxsize=None)
def _make_sgd_advance(grad_k, hvp_k, d):
    @nb.njit(**NUMBA_OPTIONS)
    def advance(z, kp, xi, V, z_out, V_out, work, wv):
        h, data = kp[0], kp[1]
        lr = h[LR]
        g = wv[0]
        HV = work[0]
        grad_k(z, data, xi, g)
        hvp_k(z, data, xi, V, HV)
        for i in range(d):
            z_out[i] = z[i] - lr * g[i]
        k = V.shape[1]
        for i in range(d):
            for c in range(k):
                V_out[i, c] = V[i, c] - lr * HV[i, c]

    return advance


@functools.lru_cache(maxsize=None)
def _make_momentum_advance(grad_k, hvp_k, d):
    @nb.njit(**NUMBA_OPTIONS)
    def advance(z, kp, xi, V, z_out, V_out, work, wv):
        h, data = kp[0], kp[1]
        lr, beta = h[LR], h[BETA]
        x = z[:d]
        g = wv[0]
        HV = work[0]
        grad_k(x, data, xi, g)
        hvp_k(x, data, xi, V[:d], HV[:d])
        for i in range(d):
            m_new = beta * z[d + i] + g[i]
            z_out[d + i] = m_new
            z_out[i] = z[i] - lr * m_new
        k = V.shape[1]
        for i in range(d):
            for c in range(k):
                dm = beta * V[d + i, c] + HV[i, c]
                V_out[d + i, c] = dm
                V_out[i, c] = V[i, c] - lr * dm

    return advance


@functools.lru_cache(maxsize=None)
def _make_adam_advance(grad_k, hvp_k, d, frozen):
    @nb.njit(**NUMBA_OPTIONS)
    def advance(z, kp, xi, V, z_out, V_out, work, wv):
        h, data = kp[0], kp[1]
        lr, b1, b2, eps, wd = h[LR], h[BETA1], h[BETA2], h[EPS], h[WD]
        decoupled = h[DECOUPLED] != 0.0
        t = xi[0]
        idx = xi[1:]
        x = z[:d]
        g = wv[0]
        HV = work[0]
        grad_k(x, data, idx, g)
        hvp_k(x, data, idx, V[:d], HV[:d])
        l2 = 0.0 if decoupled else wd
        shrink = 1.0 - lr * wd if decoupled else 1.0
        c1 = 1.0 - b1 ** t
        c2 = 1.0 - b2 ** t
        k = V.shape[1]
        for i in range(d):
            gi = g[i] + l2 * x[i]
            m_new = b1 * z[d + i] + (1.0 - b1) * gi
            v_new = b2 * z[2 * d + i] + (1.0 - b2) * gi * gi
            mh = m_new / c1
            vh = v_new / c2
            sq = np.sqrt(vh)
            den = sq + eps
            z_out[i] = x[i] * shrink - lr * mh / den
            z_out[d + i] = m_new
            z_out[2 * d + i] = v_new
            if frozen:
                # labelled approximation: I - eta P^{-1} (H + l2 I), P = diag(sqrt(v_hat) + eps)
                for c in range(k):
                    V_out[i, c] = shrink * V[i, c] - lr * (HV[i, c] + l2 * V[i, c]) / den
            else:
                # d sqrt(vh)/d vh = 1/(2 sqrt(vh)); at vh = 0 the coordinate has g = m = 0 and
                # the term is taken as 0
                dsq = 0.0 if sq == 0.0 else 0.5 / sq
                for c in range(k):
                    dg = HV[i, c] + l2 * V[i, c]
                    dm = b1 * V[d + i, c] + (1.0 - b1) * dg
                    dv = b2 * V[2 * d + i, c] + 2.0 * (1.0 - b2) * gi * dg
                    dden = dsq * dv / c2
                    V_out[i, c] = shrink * V[i, c] - lr * (dm / c1 / den - mh * dden / (den * den))
                    V_out[d + i, c] = dm
                    V_out[2 * d + i, c] = dv

    return advance


class OptimizerMap(AbstractNumbaSystem):
    """An optimizer on a toy loss as a numba random map; build it with :func:`optimizer_map`.

    Attributes:
        loss: the :class:`rdsim.losses.ToyLoss`.
        spec: the :class:`rdsim.optim.OptimizerSpec`.
        n_params: d, the number of loss parameters.
        dim: size of the optimizer state, d, 2d (x, m) or 3d (x, m, v).
        tangent_dim: dimension of the tangent space (= dim, or d for Adam's frozen preconditioner).
        tangent: "exact" or "frozen".
    """

    def __init__(self, loss: ToyLoss, spec: OptimizerSpec, tangent: str = "exact"):
        if not isinstance(loss, ToyLoss):
            raise TypeError(f"loss: expected an rdsim.losses loss, got {type(loss).__name__}")
        if not isinstance(spec, OptimizerSpec):
            raise TypeError(f"optimizer: expected a spec from rdsim.optim (gd, sgd, momentum, adam), got {type(spec).__name__}")
        if tangent not in ("exact", "frozen"):
            raise ValueError(f"tangent: expected 'exact' or 'frozen', got {tangent!r}")
        if tangent == "frozen" and spec.kind != "adam":
            raise ValueError("tangent: 'frozen' (I - eta P^-1 H) applies to adam only")
        spec.check_data_size(loss.n)
        self.loss, self.spec, self.tangent_kind = loss, spec, tangent
        d = loss.dim
        self.n_params = d
        self.dim = d * (1 + spec.n_buffers)
        self._tangent_dim = d if tangent == "frozen" else self.dim
        self.dt = 1.0
        b = spec.batch_size or 0
        self._b = b
        self.noise_dim = b + (1 if spec.kind == "adam" else 0)
        self.name = f"{spec.label()} on {loss.name}"
        if spec.kind in ("gd", "sgd"):
            self._advance = _make_sgd_advance(loss._grad, loss._hvp, d)
        elif spec.kind == "momentum":
            self._advance = _make_momentum_advance(loss._grad, loss._hvp, d)
        else:
            self._advance = _make_adam_advance(loss._grad, loss._hvp, d, tangent == "frozen")
        self._kernel_params = (_hyper(spec), loss.data)
        self._n_work = 1
        self._n_wv = 1
        if loss.x0 is not None:
            self.x0 = self.initial_state(loss.x0)

    @property
    def tangent_dim(self) -> int:
        return self._tangent_dim

    # noise: [t] (Adam) + minibatch indices ------------------------------------------------------
    def noise_sampler(self, rng):
        return noise_sampler(self.spec, self.loss.n, rng)

    def sample_noise(self, rng, n):
        """The noise of the first n steps for a fresh generator (see :meth:`noise_sampler`)."""
        return self.noise_sampler(rng)(n)

    def initial_state(self, x0):
        """Accept the parameters only (buffers start at zero) or the full optimizer state."""
        if x0 is None:
            x0 = getattr(self, "x0", None)
            if x0 is None:
                raise ValueError(f"x0: pass initial parameters of shape ({self.n_params},)")
            return np.array(x0)
        try:
            x = np.array(x0, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise TypeError("x0: expected an array of real numbers") from err
        d = self.n_params
        if x.shape[0] == d and self.dim != d:
            x = np.concatenate([x, np.zeros(self.dim - d)])
        if x.shape != (self.dim,):
            raise ValueError(f"x0: expected the parameters, shape ({d},), or the full optimizer state, shape ({self.dim},); got {np.shape(x0)}")
        if not np.all(np.isfinite(x)):
            raise ValueError("x0: must be finite")
        if self.spec.kind == "adam" and np.any(x[2 * d:] < 0):
            raise ValueError("x0: Adam's second-moment buffer v (last d entries) must be non-negative")
        return np.ascontiguousarray(x)

    def tangent(self, x, xi, V):
        V = np.ascontiguousarray(V, dtype=np.float64)
        if V.ndim != 2 or V.shape[0] != self.tangent_dim:
            raise ValueError(f"V: expected shape ({self.tangent_dim}, k), got {V.shape}")
        x = np.ascontiguousarray(x, dtype=np.float64)
        x_out, V_out, work, wv = self._buffers(V.shape[1])
        self._advance(x, self._kernel_params, self._xi(xi), V, x_out, V_out, work, wv)
        return V_out

    def jacobian(self, x, xi=None):
        return self.tangent(x, xi, np.eye(self.tangent_dim))

    def step(self, x, xi=None):
        x = np.ascontiguousarray(x, dtype=np.float64)
        x_out, V_out, work, wv = self._buffers(1)
        self._advance(x, self._kernel_params, self._xi(xi), np.zeros((self.tangent_dim, 1)), x_out, V_out, work, wv)
        return x_out


def optimizer_map(loss: ToyLoss, optimizer: OptimizerSpec, *, tangent: str = "exact") -> OptimizerMap:
    """The optimizer ``optimizer`` on the toy loss ``loss`` as a numba random map.

    Example:
        >>> import numpy as np, rdsim
        >>> A = np.diag([1.0, 3.0, 5.0])
        >>> system = rdsim.optimizer_map(rdsim.losses.quadratic(A), rdsim.optim.gd(0.5))
        >>> res = rdsim.lyapunov_spectrum(system, np.ones(3), 200, transient=100)
        >>> bool(np.allclose(res.exponents, np.sort(np.log(np.abs(1 - 0.5 * np.diag(A))))[::-1], atol=1e-8))
        True
    """
    return OptimizerMap(loss, optimizer, tangent)
