"""The optimizer updates on flat torch tensors and their tangents, op for op as ``torch.optim`` (private).

One implementation of each optimizer's math on the torch side: :class:`rdsim.torch.OptimizerMap`
(hyperparameters from an :mod:`rdsim.optim` spec) and :class:`rdsim.torch.TrainingMonitor`
(hyperparameters read from a ``torch.optim`` optimizer's ``param_groups`` at each step) both call
:func:`update` and :func:`tangent`.

The state is z = (x), (x, m) or (x, m, v), each block of length d, concatenated along the last
dimension. Hyperparameters are Python floats, or (d,) tensors when parameter groups differ.
For SGD and momentum the update is linear and homogeneous in (z, g), so its tangent is the same
function applied to the tangents (V, H V), with any leading batch dimensions; Adam's tangent is
the forward-mode derivative (``torch.func.jvp``) of :func:`update` with respect to (z, g).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.func import jvp, vmap

__all__ = ["Hyper", "update", "tangent", "n_buffers"]

_mul = torch.ops.aten.mul.Scalar
_div = torch.ops.aten.div.Scalar
_adds = torch.ops.aten.add.Scalar

KINDS = ("sgd", "momentum", "adam")


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The hyperparameters of one step of a torch.optim-style update.

    Attributes:
        kind: "sgd" (also GD), "momentum" (torch.optim.SGD with momentum > 0) or "adam".
        lr: learning rate (a float, or a (d,) tensor when parameter groups differ; likewise the
            other numeric fields).
        weight_decay: L2 decay added to the gradient, g <- g + wd x (torch.optim's ``weight_decay``
            for SGD and Adam).
        momentum, dampening, nesterov: torch.optim.SGD's.
        first: the momentum buffer does not exist yet: torch.optim then sets buf = g (without
            dampening). The map takes it as buf = momentum * m + g with the state's m = 0: the
            same value, and a tangent that keeps the m-directions (buf = g alone would make the
            Jacobian singular in them).
        beta1, beta2, eps: Adam's.
        decoupled_wd: AdamW's decoupled decay, x <- x (1 - lr wd) (0 for Adam).
    """

    kind: str
    lr: Any
    weight_decay: Any = 0.0
    momentum: Any = 0.0
    dampening: Any = 0.0
    nesterov: bool = False
    first: bool = False
    beta1: Any = 0.9
    beta2: Any = 0.999
    eps: Any = 1e-8
    decoupled_wd: Any = 0.0


def n_buffers(kind: str) -> int:
    return {"sgd": 0, "momentum": 1, "adam": 2}[kind]


def _is_zero(v) -> bool:
    return isinstance(v, (int, float)) and v == 0


def _scale(a: torch.Tensor, s) -> torch.Tensor:
    """a * s; Python numbers go through the ``.Scalar`` overload, whose forward-mode formula is plain
    (inside ``jvp`` a Python number times a dual tensor takes a slow path of about 0.3 ms per op)."""
    return _mul(a, float(s)) if isinstance(s, (int, float)) else a * s


def _axpy(a: torch.Tensor, b: torch.Tensor, s) -> torch.Tensor:
    """a + s * b."""
    return torch.add(a, b, alpha=float(s)) if isinstance(s, (int, float)) else a + s * b


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt(v) for v >= 0 whose derivative at v = 0 is taken as 0 (as the numba Adam map does).

    The value is exactly ``torch.sqrt(v)``; only the derivative differs, and only at v = 0, where a
    coordinate with zero gradient and zero second moment would otherwise produce inf * 0 = nan.
    """
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, 1.0)), 0.0)


def update(h: Hyper, z: torch.Tensor, g: torch.Tensor, t=1.0) -> torch.Tensor:
    """The new state f(z) given the minibatch loss gradient g at x = z[..., :d] (op for op as torch.optim).

    ``t`` is Adam's step counter (1, 2, ...; a float, or a 0-d tensor under ``torch.compile``).
    """
    d = g.shape[-1]
    x = z[..., :d]
    if not _is_zero(h.weight_decay):
        g = _axpy(g, x, h.weight_decay)  # grad = grad.add(param, alpha=weight_decay)
    if h.kind == "sgd":
        return _axpy(x, g, -h.lr) if not isinstance(h.lr, torch.Tensor) else x - h.lr * g
    if h.kind == "momentum":
        if h.first:
            m = _axpy(g, z[..., d:2 * d], h.momentum)  # buf = torch.clone(grad), with m = 0 here
        else:
            m = _scale(z[..., d:2 * d], h.momentum)  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            m = _axpy(m, g, 1.0 - h.dampening) if not isinstance(h.dampening, torch.Tensor) else m + (1.0 - h.dampening) * g
        step = _axpy(g, m, h.momentum) if h.nesterov else m  # grad.add(buf, alpha=momentum) or buf
        x = x - h.lr * step if isinstance(h.lr, torch.Tensor) else torch.add(x, step, alpha=-float(h.lr))
        return torch.cat([x, m], dim=-1)
    if h.kind != "adam":
        raise ValueError(f"unknown optimizer kind {h.kind!r}")
    m, v = z[..., d:2 * d], z[..., 2 * d:]
    if not _is_zero(h.decoupled_wd):
        x = _scale(x, 1.0 - h.lr * h.decoupled_wd)  # param.mul_(1 - lr * weight_decay)
    m = torch.lerp(m, g, 1.0 - h.beta1) if not isinstance(h.beta1, torch.Tensor) else m + (1.0 - h.beta1) * (g - m)
    v = _scale(v, h.beta2)
    v = torch.addcmul(v, g, g, value=1.0 - h.beta2) if not isinstance(h.beta2, torch.Tensor) else v + (1.0 - h.beta2) * g * g
    bias_correction1 = 1.0 - h.beta1 ** t
    bias_correction2 = 1.0 - h.beta2 ** t
    step_size = h.lr / bias_correction1
    root = bias_correction2 ** 0.5
    s = _safe_sqrt(v)
    denom = _div(s, root) if isinstance(root, float) else s / root
    denom = _adds(denom, h.eps) if isinstance(h.eps, float) else denom + h.eps
    ratio = torch.div(m, denom)
    x = torch.add(x, ratio, alpha=-step_size) if isinstance(step_size, float) else x - step_size * ratio
    return torch.cat([x, m, v], dim=-1)


def tangent(h: Hyper, z: torch.Tensor, g: torch.Tensor, V: torch.Tensor, HV: torch.Tensor, t=1.0) -> torch.Tensor:
    """Df(z) V for a (k, len(z)) block of tangent rows V, given HV = H_B V[:, :d] (the loss Hessian
    applied to the parameter part; the L2 term of ``weight_decay`` is added by :func:`update`)."""
    if h.kind != "adam":
        return update(h, V, HV, t)  # linear and homogeneous in (z, g)

    def f(zz, gg):
        return update(h, zz, gg, t)

    return vmap(lambda v, hv: jvp(f, (z, g), (v, hv))[1])(V, HV)
