"""Monitoring a user's own training loop (private; public name ``rdsim.torch.TrainingMonitor``).

The user keeps their loop (any ``DataLoader``, a ``torch.optim`` optimizer, a scheduler, a GPU) and
adds one call per step, right before ``optimizer.step()``::

    monitor = rdsim.torch.TrainingMonitor(model, loss_fn, optimizer, k=8)
    for inputs, targets in loader:
        loss = loss_fn(model(inputs), targets); optimizer.zero_grad(); loss.backward()
        monitor.observe(inputs, targets)
        optimizer.step(); scheduler.step()
    print(monitor.lyapunov())

Two ways to follow the trajectory's tangent dynamics:

* ``method="tangent"``: k tangent vectors pushed through the exact derivative of the update the
  optimizer is about to make (hyperparameters read from ``optimizer.param_groups`` at that step,
  so schedulers are followed; state from ``optimizer.state``). The math is that of
  :class:`rdsim.torch.OptimizerMap` (:mod:`rdsim.torch._update`), the QR that of its device loop.
* ``method="twin"``: Benettin's two-trajectory method, for any optimizer and any step.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import tempfile
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .._dimension import Dimension, kaplan_yorke_dimension
from .._lyapunov import LyapunovResult
from .._validate import UserFunctionError
from . import _update as _upd
from ._functional import FlatModel, check_no_dropout
from ._qr import cholqr_rows, householder_rows

__all__ = ["TrainingMonitor", "MEASURES"]

#: the curvature measures ``measures=`` may name
MEASURES = ("sharpness", "trace", "sd", "loss")

#: device rows of per-step logs kept before they are stacked into one tensor
_STACK_EVERY = 256


def _supported(optimizer) -> str | None:
    """The update kind of a torch.optim optimizer the tangent method supports, or None."""
    t = type(optimizer)
    if t is torch.optim.SGD:
        return "sgd"
    if t in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    return None


def _check_pos_int(value, name, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


class TrainingMonitor:
    """Lyapunov exponents and curvature of a user's own training run, observed step by step.

    Call :meth:`observe` once per training step, after ``loss.backward()`` and right before
    ``optimizer.step()``, with the step's minibatch. :meth:`lyapunov` returns a
    :class:`rdsim.LyapunovResult` of the steps observed so far; :attr:`records` holds the
    measures taken every ``every`` steps.

    Methods:

    * ``"tangent"`` (exact): the optimizer is one of ``torch.optim.SGD`` (momentum, dampening,
      nesterov, weight decay), ``Adam`` or ``AdamW`` (``amsgrad=False``, ``maximize=False``). At each
      step the k tangent vectors of the full optimizer state z = (x), (x, m) or (x, m, v) are pushed
      through Df(z) of the update the optimizer is about to make: the hyperparameters come from
      ``optimizer.param_groups`` at that step (per-group values become per-coordinate), the state
      from ``optimizer.state`` (momentum buffers, Adam's m, v and step counter; a buffer that does
      not exist yet is zero), the gradient and Hessian-vector products from
      ``loss_fn(model(inputs), targets)`` at the current parameters. It assumes that the step uses
      that gradient as it is: gradient clipping, accumulation over several backward passes, a loss
      other than ``loss_fn`` or mixed precision make the step a different map; use ``"twin"`` then.
      The QR is :func:`rdsim.torch._qr.cholqr_rows` (Householder when a block is ill-conditioned);
      accumulators are float64. ``k=None``: the full spectrum of the optimizer state.
    * ``"twin"`` (any optimizer): a shadow copy of the model and of the optimizer state starts at a
      relative distance ``delta`` (x' = x + delta ||x|| u, u a seeded random unit vector), is
      stepped on the same minibatch with the same hyperparameters (``step_fn`` reproduces the
      user's step: clipping, autocast, anything), and the separation d_t = ||x'_t - x_t|| of the
      parameters is renormalised to d_0 every ``renorm_every`` steps (the whole state difference,
      buffers included, is scaled). lambda_1 = sum log(d / d_0) / steps. Cost: one extra training
      step per step. Precision: in float32 the parameters carry relative rounding ~6e-8, so with
      delta = 1e-4 each renormalisation reads log(d / d_0) to about 1e-3; averaged over T steps the
      exponent's resolution is about 1e-3 / sqrt(T * renorm_every) per step, and delta must stay
      small enough for the separation to be linear (raise renorm_every only while d / d_0 stays
      below ~10^3). Only the top exponent (k = 1).

    Measures (every ``every`` steps, on the current minibatch or on ``data``; each timed):
    ``"sharpness"`` lambda_max(H) by Lanczos, ``"trace"`` tr(H) by Hutch++, ``"sd"`` the sharpness
    dimension (:func:`rdsim.torch.sharpness_dimension`, "exact" up to 2,048 parameters, "slq"
    above; lr = the first group's current learning rate; its baselines rds_sharpness, lambda_max,
    trace are recorded too), ``"loss"`` the loss. Each record also holds the step, the learning
    rate, the running top exponents (or the twin estimate) and the monitor's own seconds since the
    last record (``monitor_seconds``, the cost of observing) and per measure (``<name>_seconds``).

    Device: everything stays on the model's device. ``observe`` waits for the device only at
    ``every`` steps (and, on a CPU, where there is nothing to wait for, it checks each QR).

    Args:
        model: the network being trained (never modified by the monitor).
        loss_fn: ``loss_fn(outputs, targets)`` -> the mean loss, as in the training loop.
        optimizer: the ``torch.optim`` optimizer of the loop.
        k: tangent vectors (exponents); None: all of the optimizer state (tangent method).
        method: "tangent" or "twin".
        every: steps between measures (None: no measures).
        measures: names from :data:`MEASURES`.
        seed: seeds the start block (or the twin's direction) and the measures' probes.
        data: a held-out batch ``(inputs, targets)`` for the measures (default: the current
            minibatch).
        qr_every: steps between QR factorisations (tangent method).
        delta, renorm_every, step_fn: twin method (``step_fn(model, optimizer, inputs, targets)``
            performs one training step of the shadow; default: zero_grad, backward of ``loss_fn``,
            ``optimizer.step()``).
        chunk_size: tangent vectors per batched HVP (bounds memory).
        hvp: how the Hessian-vector products are taken, as in :class:`rdsim.torch.OptimizerMap`:
            "auto" (written out for a recognised chain of Linear layers and elementwise
            activations, else reverse-over-reverse), "mlp", "reverse" or "forward";
            ``monitor.hvp_mode`` says which is used.
        measure_options: per-measure keyword arguments, e.g. ``{"sd": {"method": "slq"}}``,
            ``{"sharpness": {"tol": 1e-4}}``, ``{"trace": {"n_probes": 32}}``.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with
            ``add_scalar(tag, value, step)``), or a log directory for a new SummaryWriter: every
            record is also logged there.

    Raises:
        TypeError / ValueError: naming the argument; an optimizer the tangent method does not
            support (the message names ``method="twin"``); dropout in train mode.
        RuntimeError: from :meth:`observe`, when it is called twice without an
            ``optimizer.step()`` in between, or the optimizer stepped more than once since the last
            call (each step must be observed once).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, *,
                 k: int | None = 8, method: str = "tangent", every: int | None = None,
                 measures: Sequence[str] = ("sharpness",), seed: int = 0, data=None, qr_every: int = 1,
                 delta: float = 1e-4, renorm_every: int = 10, step_fn: Callable | None = None,
                 chunk_size: int | None = None, measure_options: dict | None = None, writer=None,
                 hvp: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a function loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if method not in ("tangent", "twin"):
            raise ValueError(f"method: expected 'tangent' or 'twin', got {method!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        self.every = _check_pos_int(every, "every", allow_none=True)
        self.qr_every = _check_pos_int(qr_every, "qr_every")
        self.chunk_size = _check_pos_int(chunk_size, "chunk_size", allow_none=True)
        if isinstance(measures, str):
            measures = (measures,)
        measures = tuple(measures)
        bad = [m for m in measures if m not in MEASURES]
        if bad:
            raise ValueError(f"measures: unknown {bad}; expected names from {MEASURES}")
        self.measures = measures
        self.measure_options = dict(measure_options or {})
        for name, opts in self.measure_options.items():
            if name not in MEASURES or not isinstance(opts, dict):
                raise ValueError(f"measure_options: expected {{measure name: dict of options}}, got {name!r}: {opts!r}")
        check_no_dropout(model, "a TrainingMonitor")
        self.model, self.loss_fn, self.optimizer, self.method = model, loss_fn, optimizer, method
        self.seed = int(seed)
        self.data = data
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        if not opt_params:
            raise ValueError("optimizer: has no parameters")
        model_ids = {id(p) for p in model.parameters()}
        foreign = [p for p in opt_params if id(p) not in model_ids]
        if foreign:
            raise ValueError(f"optimizer: {len(foreign)} of its parameters are not parameters of model")
        self._fm = FlatModel(model, loss_fn, params=opt_params, copy_constants=False)
        self._fm.set_hvp(hvp)
        self.hvp = hvp
        self.device, self.dtype = self._fm.device, self._fm.dtype
        self.n_params = d = self._fm.n_params
        # the optimizer's parameters in the flat layout, and the group of each
        by_id = {id(p): p for p in opt_params}
        self._params = [by_id[id(p)] for _, p in self._fm.named_params]
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self._group_index = [group_of[id(p)] for p in self._params]

        if method == "tangent":
            kind = _supported(optimizer)
            if kind is None:
                raise ValueError(f"optimizer: {type(optimizer).__module__}.{type(optimizer).__name__} is not supported "
                                 "by method='tangent' (exact derivative of torch.optim.SGD, Adam and AdamW); "
                                 "use method='twin', which follows any optimizer")
            for g in optimizer.param_groups:
                if g.get("amsgrad", False):
                    raise ValueError("optimizer: amsgrad=True is not supported by method='tangent' (the max "
                                     "of the second moments is not differentiable); use method='twin'")
                if g.get("maximize", False):
                    raise ValueError("optimizer: maximize=True is not supported by method='tangent'; use method='twin'")
                if kind == "sgd" and g.get("momentum", 0) and g.get("momentum", 0) >= 1:
                    raise ValueError("optimizer: momentum must be below 1")
            self._opt_kind = kind
            self._momentum = kind == "sgd" and any(g.get("momentum", 0) for g in optimizer.param_groups)
            if self._momentum and not all(g.get("momentum", 0) for g in optimizer.param_groups):
                raise ValueError("optimizer: method='tangent' needs momentum in every parameter group or in none")
            n_buf = 2 if kind == "adam" else (1 if self._momentum else 0)
            self.dim = d * (1 + n_buf)
            if k is None:
                k = self.dim
            k = _check_pos_int(k, "k")
            if k > self.dim:
                raise ValueError(f"k: expected 1 <= k <= {self.dim} (the optimizer state's dimension), got {k}")
            rng = np.random.default_rng(np.random.SeedSequence(self.seed).spawn(1)[0])
            from .._lyapunov import start_block
            Q0 = start_block(self.dim, k, rng)
            self._Q = torch.as_tensor(np.ascontiguousarray(Q0.T)).to(device=self.device, dtype=self.dtype)
        else:
            if k is None or k != 1:
                if k not in (None, 1):
                    raise ValueError(f"k: method='twin' gives the top exponent only (k=1), got k={k}")
            k = 1
            self.dim = d
            self.delta = float(delta)
            if not (0 < self.delta < 1):
                raise ValueError(f"delta: expected a relative distance in (0, 1), got {delta!r}")
            self.renorm_every = _check_pos_int(renorm_every, "renorm_every")
            if step_fn is not None and not callable(step_fn):
                raise TypeError("step_fn: expected step_fn(model, optimizer, inputs, targets)")
            self._step_fn = step_fn or self._default_step
            self._shadow = None
        self.k = k
        self._householder = False
        self._qr_flags: list[torch.Tensor] = []
        self.qr_note = ""
        # per-step device logs: rows (log|R_ii| ... (zeros between QR steps), batch loss)
        self._rows: list[torch.Tensor] = []
        self._stacked: list[torch.Tensor] = []
        self._since_qr = 0
        self.n_steps = 0
        self.lr_history: list[float] = []
        self.records: list[dict] = []
        self._monitor_time = 0.0
        self._opt_steps = 0
        self._last_seen = 0
        self._hook = optimizer.register_step_post_hook(self._count_step)
        self._writer = self._make_writer(writer)
        self._twin_logs: list[torch.Tensor] = []
        self._twin_pending_steps = 0
        self._check_from = 0

    # -- bookkeeping -----------------------------------------------------------------------------
    def _count_step(self, optimizer, args, kwargs):
        self._opt_steps += 1

    def close(self) -> None:
        """Detach the monitor from the optimizer (its step hook) and flush the writer."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._writer is not None and hasattr(self._writer, "flush"):
            self._writer.flush()

    @staticmethod
    def _make_writer(writer):
        if writer is None or hasattr(writer, "add_scalar"):
            return writer
        if isinstance(writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("writer: TensorBoard logging needs the 'tensorboard' package "
                                 "(pip install tensorboard); or pass any object with add_scalar(tag, value, step)") from err
            return SummaryWriter(log_dir=str(writer))
        raise TypeError(f"writer: expected a SummaryWriter, an object with add_scalar, or a log directory, got {type(writer).__name__}")

    def _check_step_count(self):
        if self.n_steps == self._check_from:  # the first observed step (of this process)
            self._last_seen = self._opt_steps
            return
        stepped = self._opt_steps - self._last_seen
        if stepped == 0:
            raise RuntimeError("observe: called twice without an optimizer.step() in between; call it once "
                               "per training step, right before optimizer.step()")
        if stepped > 1:
            raise RuntimeError(f"observe: the optimizer stepped {stepped} times since the last call; every step "
                               "must be observed (call observe once per step, right before optimizer.step())")
        self._last_seen = self._opt_steps

    def _batch(self, inputs, targets):
        xb = inputs.to(self.device) if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs, device=self.device)
        yb = targets.to(self.device) if isinstance(targets, torch.Tensor) else torch.as_tensor(targets, device=self.device)
        if xb.is_floating_point():
            xb = xb.to(self.dtype)
        if yb.is_floating_point():
            yb = yb.to(self.dtype)
        return xb, yb

    # -- hyperparameters and state of the user's optimizer ---------------------------------------
    def _group_values(self, key, default):
        vals = [g.get(key, default) for g in self.optimizer.param_groups]
        vals = [float(v) if isinstance(v, torch.Tensor) else v for v in vals]
        if all(v == vals[0] for v in vals):
            return float(vals[0]) if not isinstance(vals[0], bool) else vals[0]
        parts = [torch.full((p.numel(),), float(vals[gi]), device=self.device, dtype=self.dtype)
                 for p, gi in zip(self._params, self._group_index)]
        return torch.cat(parts)

    def _hyper_and_state(self):
        """(Hyper, state z, Adam's step t) of the step the optimizer is about to make."""
        opt, fm = self.optimizer, self._fm
        x = fm.flat()
        st = opt.state
        if self._opt_kind == "sgd":
            if not self._momentum:
                return _upd.Hyper("sgd", self._group_values("lr", 0.0),
                                  weight_decay=self._group_values("weight_decay", 0.0)), x, 1.0
            bufs = [st[p].get("momentum_buffer") if p in st else None for p in self._params]
            first = [b is None for b in bufs]
            if any(first) and not all(first):
                raise RuntimeError("optimizer: some momentum buffers exist and others not; cannot follow this state")
            nesterov = [bool(g.get("nesterov", False)) for g in opt.param_groups]
            if any(nesterov) and not all(nesterov):
                raise ValueError("optimizer: method='tangent' needs nesterov in every parameter group or in none")
            h = _upd.Hyper("momentum", self._group_values("lr", 0.0), weight_decay=self._group_values("weight_decay", 0.0),
                           momentum=self._group_values("momentum", 0.0), dampening=self._group_values("dampening", 0.0),
                           nesterov=nesterov[0], first=first[0])
            return h, torch.cat([x, fm.flat_of(bufs)]), 1.0
        # Adam / AdamW
        steps = [st[p].get("step") if p in st else None for p in self._params]
        steps = [0.0 if s is None else float(s) for s in steps]
        if any(s != steps[0] for s in steps):
            raise RuntimeError("optimizer: its parameters have different step counts; cannot follow this state")
        t = steps[0] + 1.0
        m = [st[p].get("exp_avg") if p in st else None for p in self._params]
        v = [st[p].get("exp_avg_sq") if p in st else None for p in self._params]
        decoupled = [type(opt) is torch.optim.AdamW or bool(g.get("decoupled_weight_decay", False)) for g in opt.param_groups]
        if any(decoupled) and not all(decoupled):
            raise ValueError("optimizer: mixed decoupled and L2 weight decay across groups is not supported")
        betas = [g["betas"] for g in opt.param_groups]
        b1 = self._scalar_or_vec([float(b[0]) for b in betas])
        b2 = self._scalar_or_vec([float(b[1]) for b in betas])
        wd = self._group_values("weight_decay", 0.0)
        h = _upd.Hyper("adam", self._group_values("lr", 0.0), weight_decay=0.0 if decoupled[0] else wd,
                       beta1=b1, beta2=b2, eps=self._group_values("eps", 1e-8), decoupled_wd=wd if decoupled[0] else 0.0)
        return h, torch.cat([x, fm.flat_of(m), fm.flat_of(v)]), t

    def _scalar_or_vec(self, vals):
        if all(v == vals[0] for v in vals):
            return vals[0]
        return torch.cat([torch.full((p.numel(),), vals[gi], device=self.device, dtype=self.dtype)
                          for p, gi in zip(self._params, self._group_index)])

    @property
    def hvp_mode(self) -> str:
        """How the Hessian-vector products are taken: "mlp", "reverse" or "forward" (see ``hvp``);
        "reverse" until the first observed step decides."""
        return self._fm.hvp_mode

    @property
    def lr(self) -> float:
        """The first parameter group's current learning rate."""
        lr = self.optimizer.param_groups[0]["lr"]
        return float(lr)

    # -- the step --------------------------------------------------------------------------------
    def observe(self, inputs, targets) -> None:
        """Observe one training step on the minibatch (inputs, targets); call it right before optimizer.step()."""
        t0 = time.perf_counter()
        self._check_step_count()
        xb, yb = self._batch(inputs, targets)
        lr = self.lr
        try:
            if self.method == "tangent":
                self._observe_tangent(xb, yb)
            else:
                self._observe_twin(xb, yb)
        except Exception as err:  # the model's forward or loss_fn failed on this minibatch
            raise UserFunctionError("model/loss_fn", err, step=self.n_steps,
                                    where=f"observe(inputs {tuple(xb.shape)}, targets {tuple(yb.shape)})") from err
        self.lr_history.append(lr)
        self.n_steps += 1
        self._monitor_time += time.perf_counter() - t0
        if self.every is not None and (self.n_steps - 1) % self.every == 0:
            self._measure(self.n_steps - 1, xb, yb)

    def _observe_tangent(self, xb, yb):
        h, z, t = self._hyper_and_state()
        g, TV, loss = self._fm.grad_tangent(h, z, self._Q, xb, yb, self.chunk_size, t)
        self._fm.check_hvp(self.hvp)
        TV = TV.detach()
        self._since_qr += 1
        if self._since_qr == self.qr_every:
            logd = self._qr(TV)
            self._since_qr = 0
        else:
            self._Q = TV
            logd = torch.zeros(self.k, device=self.device, dtype=torch.float64)
        self._push_row(torch.cat([logd, loss.detach().to(torch.float64).reshape(1)]))

    def _qr(self, V):
        """Factorise the pushed block, keep Q, return log|R_ii| (float64, on the device)."""
        if self._householder:
            Q, logd = householder_rows(V, self.dtype)
        else:
            Q, logd, ok = cholqr_rows(V)
            if self.device.type == "cpu":  # nothing to wait for: check now, redo if flagged
                if not bool(ok):
                    self._householder = True
                    self.qr_note = ("an ill-conditioned tangent block was met: Householder QR from step "
                                    f"{self.n_steps} on")
                    Q, logd = householder_rows(V, self.dtype)
            else:
                self._qr_flags.append(ok)
        self._Q = Q
        return logd

    def _push_row(self, row):
        self._rows.append(row)
        if len(self._rows) >= _STACK_EVERY:
            self._stacked.append(torch.stack(self._rows))
            self._rows = []

    def _consolidate(self):
        """Stack the per-step rows into one device tensor (no host synchronisation)."""
        if self._rows:
            self._stacked.append(torch.stack(self._rows))
            self._rows = []
        if len(self._stacked) > 1:
            self._stacked = [torch.cat(self._stacked)]

    def _all_rows(self) -> np.ndarray:
        self._consolidate()
        if not self._stacked:
            return np.zeros((0, self.k + 1))
        return self._stacked[0].cpu().numpy()

    def _sync_qr_flags(self):
        if self._qr_flags:
            if not bool(torch.stack(self._qr_flags).all()):
                self._householder = True
                self.qr_note = ("a Cholesky QR of an ill-conditioned tangent block was flagged before step "
                                f"{self.n_steps}; its factorisation is accurate to ~kappa^2 u only (kappa^2 u "
                                "> 1e-10); Householder QR from here on")
                warnings.warn(f"TrainingMonitor: {self.qr_note}", RuntimeWarning, stacklevel=3)
            self._qr_flags = []

    # -- the twin method -------------------------------------------------------------------------
    def _default_step(self, model, optimizer, inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        self.loss_fn(model(inputs), targets).backward()
        optimizer.step()

    def _make_shadow(self):
        shadow = copy.deepcopy(self.model)
        real_to_shadow = {id(p): q for p, q in zip(self.model.parameters(), shadow.parameters())}
        groups = []
        for g in self.optimizer.param_groups:
            gg = {key: val for key, val in g.items() if key != "params"}
            gg["params"] = [real_to_shadow[id(p)] for p in g["params"]]
            groups.append(gg)
        opt = type(self.optimizer)(groups)
        opt.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        return shadow, opt

    def _shadow_params(self):
        ids = {id(p): i for i, p in enumerate(self.model.parameters())}
        sp = list(self._shadow.parameters())
        return [sp[ids[id(p)]] for p in self._params]

    def _separation(self):
        with torch.no_grad():
            return torch.sqrt(sum(((q.detach().to(torch.float64) - p.detach().to(torch.float64)) ** 2).sum()
                                  for p, q in zip(self._params, self._shadow_params())))

    def _rescale_shadow(self, c):
        """z' <- z + c (z' - z) for the parameters and every floating optimizer-state tensor."""
        with torch.no_grad():
            for p, q in zip(self._params, self._shadow_params()):
                q.copy_(p + (q - p) * c.to(q.dtype))
                sr, ss = self.optimizer.state.get(p, {}), self._shadow_opt.state.get(q, {})
                for key, val in ss.items():
                    ref = sr.get(key)
                    if isinstance(val, torch.Tensor) and val.is_floating_point() and isinstance(ref, torch.Tensor) \
                            and ref.shape == val.shape and key != "step":
                        new = ref + (val - ref) * c.to(val.dtype)
                        if key in ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"):
                            new = new.clamp_min(0)
                        val.copy_(new)

    def _observe_twin(self, xb, yb):
        if self._shadow is None:
            self._shadow, self._shadow_opt = self._make_shadow()
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            u = torch.randn(self.n_params, generator=gen, dtype=torch.float64)
            u = u / u.norm()
            x = self._fm.flat().to(torch.float64)
            scale = self.delta * max(float(x.norm()), 1.0)  # one host read, at the start
            with torch.no_grad():
                for q, part in zip(self._shadow_params(), (u * scale).split(self._fm.numels)):
                    q.add_(part.view_as(q).to(device=q.device, dtype=q.dtype))
            self._d0 = torch.as_tensor(scale, dtype=torch.float64, device=self.device)
        else:
            self._twin_pending_steps += 1
            if self._twin_pending_steps == self.renorm_every:
                d = self._separation()
                self._twin_logs.append(torch.log(d / self._d0))
                self._rescale_shadow(self._d0 / d)
                self._twin_pending_steps = 0
        # the shadow takes the same step, with the same hyperparameters
        for gs, gr in zip(self._shadow_opt.param_groups, self.optimizer.param_groups):
            for key, val in gr.items():
                if key != "params":
                    gs[key] = val
        self._step_fn(self._shadow, self._shadow_opt, xb, yb)

    def _twin_estimate(self):
        """(sum of log(d / d_0), steps it covers, per-renormalisation logs)."""
        logs = [float(v) for v in self._twin_logs]
        total, steps = sum(logs), len(logs) * self.renorm_every
        if self._shadow is not None and self._opt_steps > self._last_seen:
            # the user's optimizer took the last observed step, as the shadow did: both are at the
            # same step, so the separation since the last renormalisation counts too
            total += float(torch.log(self._separation() / self._d0))
            steps += self._twin_pending_steps + 1
        return total, steps, logs

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the monitor has gathered, to save beside the model's and optimizer's state dicts.

        A training run that is stopped, saved (``torch.save({"model": ..., "optimizer": ...,
        "monitor": monitor.state_dict()}, path)``) and continued in a new process with a monitor
        built with the same arguments and ``monitor.load_state_dict(...)`` gives the same
        exponents, records and history as one uninterrupted run (bitwise on CPU). Tensors are
        on the CPU; the dict holds only tensors, numbers, strings, lists and dicts.
        """
        self._sync_qr_flags()
        self._consolidate()
        st = {"format": "rdsim.TrainingMonitor/1", "method": self.method, "k": self.k, "dim": self.dim,
              "n_params": self.n_params, "seed": self.seed, "qr_every": self.qr_every, "n_steps": self.n_steps,
              "lr_history": list(self.lr_history), "records": [dict(r) for r in self.records],
              "qr_note": self.qr_note}
        if self.method == "tangent":
            st.update(Q=self._Q.detach().cpu().clone(), since_qr=self._since_qr, householder=self._householder,
                      rows=self._stacked[0].cpu().clone() if self._stacked else None)
        else:
            st.update(twin_logs=[float(v) for v in self._twin_logs], twin_pending_steps=self._twin_pending_steps,
                      d0=None if self._shadow is None else float(self._d0),
                      shadow=None if self._shadow is None else copy.deepcopy(self._shadow.state_dict()),
                      shadow_optimizer=None if self._shadow is None else copy.deepcopy(self._shadow_opt.state_dict()))
        return st

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into a monitor built with the same arguments (before observing).

        Raises:
            ValueError: ``state`` is not a monitor state, or it was made with another method, k,
                seed, qr_every or model size, or this monitor has already observed steps.
        """
        if not isinstance(state, dict) or state.get("format") != "rdsim.TrainingMonitor/1":
            raise ValueError("state: expected a dict from TrainingMonitor.state_dict()")
        if self.n_steps:
            raise ValueError("load_state_dict: this monitor has already observed steps; load into a fresh one")
        for key in ("method", "k", "dim", "n_params", "seed", "qr_every"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state: was saved with {key}={state[key]!r}, this monitor has {key}={getattr(self, key)!r}")
        self.n_steps = int(state["n_steps"])
        self._check_from = self.n_steps
        self.lr_history = list(state["lr_history"])
        self.records = [dict(r) for r in state["records"]]
        self.qr_note = state["qr_note"]
        if self.method == "tangent":
            self._Q = state["Q"].to(device=self.device, dtype=self.dtype).clone()
            self._since_qr = int(state["since_qr"])
            self._householder = bool(state["householder"])
            self._rows = []
            self._stacked = [] if state["rows"] is None else [state["rows"].to(self.device).clone()]
        else:
            self._twin_logs = [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in state["twin_logs"]]
            self._twin_pending_steps = int(state["twin_pending_steps"])
            if state["shadow"] is not None:
                self._shadow, self._shadow_opt = self._make_shadow()
                self._shadow.load_state_dict(state["shadow"])
                self._shadow_opt.load_state_dict(state["shadow_optimizer"])
                self._d0 = torch.as_tensor(state["d0"], dtype=torch.float64, device=self.device)

    # -- results ---------------------------------------------------------------------------------
    def lyapunov(self, *, transient: int = 0, n_blocks: int = 20) -> LyapunovResult:
        """The Lyapunov exponents of the steps observed so far (a :class:`rdsim.LyapunovResult`).

        Exponents per step, descending; stderr from ``n_blocks`` consecutive blocks of steps;
        ``history`` the running estimates after each step. The first ``transient`` observed steps
        align the tangent block and are left out of the averages (finite-time exponents carry a
        bias ~1/T from the random start block; their sum does not). A non-finite loss or tangent
        block is status "diverged" with the step index (counted from the first observed step).
        """
        if isinstance(transient, bool) or not isinstance(transient, (int, np.integer)) or transient < 0:
            raise ValueError(f"transient: expected a non-negative integer, got {transient!r}")
        name = f"{type(self.optimizer).__name__} on {type(self.model).__name__} (monitor, {self.method})"
        if self.method == "twin":
            return self._twin_result(name, n_blocks)
        self._flush_pending()
        rows = self._all_rows()
        n = rows.shape[0]
        k = self.k
        if n == 0:
            raise ValueError("lyapunov: no steps observed yet (call observe once per training step)")
        logs, losses = rows[:, :k], rows[:, k]
        bad = ~(np.isfinite(logs).all(axis=1) & np.isfinite(losses))
        x_final = self._fm.flat().to(torch.float64).cpu().numpy()
        Q_final = self._Q.T.to(torch.float64).cpu().numpy()
        if bad.any():
            at = int(np.argmax(bad))
            what = "loss" if not np.isfinite(losses[at]) else "tangent block"
            return LyapunovResult(exponents=np.full(k, np.nan), stderr=np.full(k, np.nan), dimension=Dimension(np.nan),
                                  status="diverged", diverged_at=at, n_steps=n, history=np.zeros((0, k)),
                                  history_steps=np.zeros(0, dtype=np.int64), x_final=x_final,
                                  message=f"the {what} became non-finite at observed step {at}", Q_final=Q_final,
                                  seed=self.seed, system_name=name)
        if transient >= n:
            raise ValueError(f"transient: {transient} leaves none of the {n} observed steps")
        return _result_from_logs(logs[transient:], n_blocks, name, self.seed, x_final, Q_final, self.dim,
                                 message=self.qr_note or "ok")

    def _flush_pending(self):
        """Factorise a block pushed since the last QR (qr_every > 1), so every observed step counts."""
        if self._since_qr:
            logd = self._qr(self._Q)
            self._since_qr = 0
            self._consolidate()
            self._stacked[0][-1, :self.k] += logd
        self._sync_qr_flags()

    def step_logs(self) -> np.ndarray:
        """(n_steps, k) float64: log|R_ii| of each observed step, in the tangent block's column order.

        Zeros on steps without a QR (``qr_every > 1``; a pending factorisation is done first). The
        finite-time exponents over steps a..b-1 are ``step_logs()[a:b].sum(0) / (b - a)``;
        :meth:`lyapunov` is the same over all steps, sorted. Method "tangent" only.
        """
        if self.method != "tangent":
            raise ValueError("step_logs: needs method='tangent' (the twin method has no per-step logs)")
        self._flush_pending()
        return self._all_rows()[:, :self.k].copy()

    def _twin_result(self, name, n_blocks):
        total, steps, logs = self._twin_estimate()
        x_final = self._fm.flat().to(torch.float64).cpu().numpy()
        if steps <= 0:
            raise ValueError("lyapunov: no steps observed yet (call observe once per training step)")
        if not math.isfinite(total):
            return LyapunovResult(exponents=np.full(1, np.nan), stderr=np.full(1, np.nan), dimension=Dimension(np.nan),
                                  status="diverged", diverged_at=None, n_steps=steps, history=np.zeros((0, 1)),
                                  history_steps=np.zeros(0, dtype=np.int64), x_final=x_final,
                                  message="the twin separation became non-finite", seed=self.seed, system_name=name)
        lam = total / steps
        per = np.asarray(logs, dtype=np.float64) / self.renorm_every
        if per.size >= 2:
            nb = min(n_blocks, per.size)
            means = np.array([b.mean() for b in np.array_split(per, nb)])
            stderr = np.array([means.std(ddof=1) / np.sqrt(nb)])
        else:
            means, stderr = None, np.array([np.nan])
        cum = np.cumsum(np.asarray(logs, dtype=np.float64))
        hist_steps = self.renorm_every * np.arange(1, cum.size + 1)
        return LyapunovResult(exponents=np.array([lam]), stderr=stderr, dimension=kaplan_yorke_dimension([lam], dim=self.dim),
                              status="ok", diverged_at=None, n_steps=steps, history=(cum / hist_steps)[:, None],
                              history_steps=hist_steps.astype(np.int64), x_final=x_final,
                              message="ok (twin method: top exponent only)",
                              block_means=None if means is None else means[:, None], seed=self.seed, system_name=name)

    # -- measures and records --------------------------------------------------------------------
    def _measure(self, step, xb, yb):
        from ._hessian import HessianOperator, hessian_eigenvalues
        from ._sharpness import sharpness_dimension
        t_start = time.perf_counter()
        self._sync_qr_flags()
        batch = self.data if self.data is not None else (xb, yb)
        if self.data is not None:
            batch = self._batch(*batch)
        rec: dict[str, Any] = {"step": step, "lr": self.lr, "monitor_seconds": self._monitor_time}
        self._monitor_time = 0.0
        if self.method == "tangent" and self.n_steps > 0:
            rows = self._all_rows()
            if rows.shape[0]:
                ex = np.sort(rows[:, :self.k].sum(axis=0) / rows.shape[0])[::-1]
                for i, v in enumerate(ex[:min(self.k, 8)]):
                    rec[f"lyapunov_{i + 1}"] = float(v)
                rec["batch_loss"] = float(rows[-1, self.k])
        elif self.method == "twin" and self._twin_logs:
            rec["lyapunov_1"] = float(sum(float(v) for v in self._twin_logs) / (len(self._twin_logs) * self.renorm_every))
        opts = self.measure_options
        for name in self.measures:
            t0 = time.perf_counter()
            o = dict(opts.get(name, {}))
            if name == "sharpness":
                o.setdefault("k", 1)
                o.setdefault("tol", 1e-4)
                o.setdefault("seed", self.seed)
                rec["sharpness"] = float(np.asarray(hessian_eigenvalues(self.model, self.loss_fn, batch, **o))[0])
                rec["two_over_lr"] = 2.0 / self.lr if self.lr > 0 else float("inf")
            elif name == "trace":
                n_probes = o.pop("n_probes", 30)
                op = HessianOperator(self.model, self.loss_fn, batch, **o)
                rec["trace"] = float(op.trace(n_probes, method="hutch++", seed=self.seed))
            elif name == "loss":
                with torch.no_grad():
                    rec["loss"] = float(self.loss_fn(self.model(batch[0]), batch[1]))
            elif name == "sd":
                n = batch[0].shape[0]
                o.setdefault("method", "exact" if self.n_params <= 2048 else "slq")
                o.setdefault("batch_size", min(n, 32))
                o.setdefault("n_batches", 4)
                o.setdefault("seed", self.seed)
                res = sharpness_dimension(self.model, self.loss_fn, batch, lr=self.lr, **o)
                rec["sd"] = float(res.value)
                rec["rds_sharpness"] = float(res.rds_sharpness)
                if np.isfinite(res.lambda_max):
                    rec["sd_lambda_max"] = float(res.lambda_max)
                if np.isfinite(res.trace):
                    rec["sd_trace"] = float(res.trace)
            rec[f"{name}_seconds"] = time.perf_counter() - t0
        rec["measure_seconds"] = time.perf_counter() - t_start
        self.records.append(rec)
        if self._writer is not None:
            for key, val in rec.items():
                if key != "step" and isinstance(val, float) and math.isfinite(val):
                    self._writer.add_scalar(f"rdsim/{key}", val, step)

    def table(self) -> dict[str, np.ndarray]:
        """The records as columns {name: array} (NaN where a record lacks the value)."""
        keys: list[str] = []
        for r in self.records:
            keys += [key for key in r if key not in keys]
        return {key: np.array([r.get(key, np.nan) for r in self.records], dtype=np.float64) for key in keys}

    def to_csv(self, path) -> str:
        """Write the records as CSV (one row per record), atomically; returns the path."""
        table = self.table()
        keys = list(table)
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".rdsim-", suffix=".csv")
        try:
            with os.fdopen(fd, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(keys)
                for i in range(len(self.records)):
                    w.writerow([repr(float(table[key][i])) if key != "step" else int(table[key][i]) for key in keys])
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def __repr__(self) -> str:
        return (f"TrainingMonitor(method={self.method!r}, k={self.k}, optimizer={type(self.optimizer).__name__}, "
                f"n_params={self.n_params:,}, steps observed={self.n_steps}, records={len(self.records)})")


def _result_from_logs(logs, n_blocks, name, seed, x_final, Q_final, dim, message="ok") -> LyapunovResult:
    """LyapunovResult from per-step log|R_ii| rows (zeros on steps without a QR)."""
    n, k = logs.shape
    sums = logs.sum(axis=0)
    exps = sums / n
    nb = max(1, min(n_blocks, n))
    blocks = np.array_split(np.arange(n), nb)
    means = np.array([logs[b].sum(axis=0) / len(b) for b in blocks])
    stderr = means.std(axis=0, ddof=1) / np.sqrt(nb) if nb >= 2 else np.full(k, np.nan)
    cum = np.cumsum(logs, axis=0)
    steps = np.arange(1, n + 1)
    stride = max(1, n // 200)
    sel = np.unique(np.r_[np.arange(stride - 1, n, stride), n - 1])
    hist = cum[sel] / steps[sel, None]
    order = np.argsort(-exps, kind="stable")
    exps, stderr, means, hist = exps[order], stderr[order], means[:, order], hist[:, order]
    return LyapunovResult(exponents=exps, stderr=stderr, dimension=kaplan_yorke_dimension(exps, dim=dim),
                          status="ok", diverged_at=None, n_steps=n, history=hist, history_steps=steps[sel].astype(np.int64),
                          x_final=x_final, message=message, block_means=means, Q_final=Q_final[:, order],
                          n_qr=int(np.count_nonzero(np.any(logs != 0, axis=1))), seed=seed, system_name=name)
