"""An optimizer on a ``torch.nn.Module`` as a random map (private; public name ``rdsim.torch.OptimizerMap``).

The state, noise layout and update rules are those of the numba backend (:mod:`rdsim._optimizer_map`)
and of ``torch.optim``; the tangent map is the forward-over-reverse derivative of the whole update
(``torch.func.jvp`` of a function that calls ``torch.func.grad``), batched over the tangent block
with ``torch.func.vmap``. The QR loop of :func:`rdsim.lyapunov_spectrum` runs on the model's device
(:meth:`OptimizerMap._run_phase`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .._engine import OK, STATE_NONFINITE, TANGENT_NONFINITE
from .._systems import AbstractSystem
from ..optim import OptimizerSpec, noise_sampler
from . import _update as _upd
from ._data import as_pair, check_finite_data
from ._functional import FlatModel, _quiet_jit_script, check_no_dropout
from ._hessian import lanczos
from ._qr import cholqr_rows, householder_rows

__all__ = ["OptimizerMap"]

#: steps per window of ``_run_phase``: the host looks at the device once per window
SYNC_EVERY = 64

_RECORD_KINDS = ("loss", "batch_loss", "sharpness", "checkpoints")


QR_METHODS = ("cholesky", "householder")
#: the HVP scheme inside ``torch.compile``: forward-over-reverse runs as fast there as reverse and
#: compiles in about 1 s instead of 5-7 s (bench_optim model, 2026-12-07)
COMPILED_HVP_MODE = "forward"


def hyper_from_spec(spec: OptimizerSpec) -> _upd.Hyper:
    """The per-step hyperparameters of :mod:`rdsim.torch._update` for an :mod:`rdsim.optim` spec."""
    if spec.kind in ("gd", "sgd"):
        return _upd.Hyper("sgd", spec.lr)
    if spec.kind == "momentum":
        return _upd.Hyper("momentum", spec.lr, momentum=spec.beta)
    wd = spec.weight_decay
    return _upd.Hyper("adam", spec.lr, weight_decay=0.0 if spec.decoupled else wd, beta1=spec.beta1,
                      beta2=spec.beta2, eps=spec.eps, decoupled_wd=wd if spec.decoupled else 0.0)


class OptimizerMap(AbstractSystem):
    """An optimizer (GD, SGD, momentum, Adam/AdamW) on a ``torch.nn.Module`` as a random map.

    The same random dynamical system as :func:`rdsim.optimizer_map` on a toy loss (MATH.md §1), with
    the loss L_B(x) = ``loss_fn(model(inputs[B]), targets[B])`` of a network:

    * state z = (x), (x, m) or (x, m, v): each block flattened in ``model.named_parameters()``
      order (trainable parameters only), concatenated, x first;
    * noise xi_t = the minibatch indices B_t (as floats, from :func:`rdsim.optim.minibatch_sampler`,
      so the same seed gives the same minibatches as the numba backend), preceded for Adam by the
      step counter t = 1, 2, ...; full batch: no indices;
    * update (torch.optim conventions): SGD x' = x - lr g; momentum m' = beta m + g, x' = x - lr m';
      Adam g <- g + wd x (L2; AdamW instead shrinks x by 1 - lr wd), m' = lerp(m, g, 1 - b1),
      v' = b2 v + (1 - b2) g^2, x' = x - (lr / (1 - b1^t)) m' / (sqrt(v') / sqrt(1 - b2^t) + eps);
    * tangent: Df(z, xi) V exactly: one batched Hessian-vector product block H_B V_x
      (forward-over-reverse, ``torch.func.jvp`` over ``torch.func.grad``, vmapped over the k
      tangents in chunks of ``chunk_size``), then the derivative of the update with respect to
      (z, g) applied to (V, H_B V_x) (:mod:`rdsim.torch._update`, shared with TrainingMonitor). ``tangent="frozen"`` (Adam only) is the labelled
      approximation V' = (1 - lr wd_decoupled) V - lr (H V + wd_L2 V) / (sqrt(v_hat') + eps) on
      the d-dimensional parameter space, exactly as the numba backend.

    The update is a pure function of (flat state, minibatch, t): the parameter block is viewed as
    a dict {name: tensor} and the model evaluated with ``torch.func.functional_call`` (buffers
    and frozen parameters passed alongside as constants). The model itself is never modified:
    its parameters are copied at construction and serve as the default initial state.
    Parameters with ``requires_grad=False`` are constants, not state. An operation without a
    forward-mode derivative through its backward (``F.huber_loss``, say) is reported as a
    ValueError at construction, where one tangent is pushed as a check.

    In :func:`rdsim.lyapunov_spectrum` the loop runs on the map's device (:meth:`_run_phase`):
    state and tangent block stay there in the map's dtype; per step one batched tangent push and,
    every ``qr_every`` steps, one thin Cholesky QR (``qr="cholesky"``: the Gram matrix in the block's
    dtype, float64 factor; see :mod:`rdsim.torch._qr` for why a float32 Gram costs no accuracy;
    checked on every step and redone with Householder when the block is ill-conditioned;
    ``qr="householder"`` always uses Householder); the logs |R_ii| accumulate in float64 on the
    device. The host looks at the device once per window of 64 steps; a non-finite loss, state
    or block (or a rank-deficient block) inside a window is located by replaying the window from
    a snapshot, and reported as status "diverged" with the step index, never an exception.

    ``compile=True`` runs the update and its tangent through ``torch.compile`` (inductor; one
    compilation per block size k, a few seconds to a minute on a CPU, more for large models);
    results equal the eager ones to rounding. If compilation fails the map warns once and runs
    eagerly (``system.compile_error`` says why).

    Modes (the model's own ``training`` flags at construction decide, module by module; a run
    refuses to start if they changed since):

    * BatchNorm (any ``_NormBase`` with running statistics) in **train mode** uses the statistics
      of the current minibatch, which is the map that training follows; the running statistics
      are neither read nor written (they are passed to the functional call as None). In **eval
      mode** it uses the running statistics as constants. In neither case is a buffer of the model
      written, inside the tangent computation or anywhere else.
    * Dropout in train mode makes the step random beyond the minibatch, which the RDS does not
      model: a module applying dropout (``nn.Dropout*``, ``nn.AlphaDropout``, attention dropout)
      in train mode raises ValueError; call ``model.eval()`` (or set p = 0). A forward pass that
      still differs between two identical calls (functional dropout, say) is refused too.

    Records (``record=``): a dict {name: every} with names "loss" (full-data training loss at
    x_s), "batch_loss" (the minibatch loss of step s, free), "sharpness" (lambda_max of the
    full-data Hessian by 20 Lanczos steps with full reorthogonalisation; give
    ``(every, {"n_iter": m})`` to change m) and "checkpoints" (the parameters x_s as a float64
    array), plus any ``name: (fn, every)`` with ``fn(step, z, system)`` returning the value to keep
    (z: the state tensor on the device). A bare callable is ``{"callback": (fn, 1)}``. Steps s count
    from 0 at the start of a run (transient included); the values are taken at the state x_s
    before step s, and after the last step when it falls on the grid. After a run,
    ``system.records`` holds lists ``records[name]`` and ``records[name + "_steps"]``.

    Args:
        model: the network (any ``torch.nn.Module`` whose forward is a deterministic function of
            parameters and inputs once dropout is off).
        loss_fn: ``loss_fn(outputs, targets)`` -> the mean loss over the batch (a scalar tensor).
        data: ``(inputs, targets)``, tensors (or arrays) with the samples along dimension 0, or a
            ``torch.utils.data.Dataset`` / ``DataLoader`` of (input, target) samples, materialised
            once into two tensors (the map draws its own replayable minibatches; a loader's sampler
            and batch size are not used).
        optimizer: a spec from :mod:`rdsim.optim` (``gd``, ``sgd``, ``momentum``, ``adam``).
        device: where everything runs (default: the model's parameters' device).
        dtype: floating dtype of parameters, floating buffers and floating data (default: the
            model's). Exponent accumulators and the QR are float64 whatever the dtype.
        chunk_size: tangent vectors per vmapped jvp (None: the whole block at once); bounds memory.
        tangent: "exact" or "frozen" (Adam only).
        record: see above.
        compile: run the update and its tangent through ``torch.compile`` (see above).
        qr: "cholesky" (default) or "householder" (see above).
        hvp: how the eager Hessian-vector products are taken (:attr:`hvp_mode` says which is used):
            "auto" (default) writes them out when the model and loss form a chain of ``Linear``
            layers and elementwise activations ending in mean cross-entropy or MSE (recognised by
            structure, checked against torch.func at construction; ~2x faster at k = 1, ~1.3x at
            k = 16 on the benchmark MLP), else "reverse"; "mlp" requires the chain (ValueError
            saying why not); "reverse" (reverse-over-reverse, falling back to forward where an
            operation has no double backward) and "forward" (forward-over-reverse) use torch.func.

    Attributes:
        dim, noise_dim, tangent_dim, dt, name, backend: the :class:`rdsim.AbstractSystem` interface.
        n_params: d, the number of trainable parameters. n_samples: n.
        param_names, param_shapes: the flat layout of x.
        records: the records of the last run (see above).
        n_jvp, n_hvp: work counters (tangent vectors pushed, Hessian-vector products for records).

    Raises:
        TypeError: model, loss_fn, data or optimizer of the wrong kind.
        ValueError: inputs and targets of different lengths, a model that cannot be applied to the
            inputs, a loss that is not a scalar, batch size above the number of samples, dropout
            in train mode, no trainable parameters, a bad ``tangent``, ``chunk_size`` or ``record``.

    Example:
        GD on least squares, L(w) = (1/2n) ||X w - y||^2: the spectrum is sorted log|1 - lr alpha_i|.

        >>> import numpy as np, torch, rdsim, rdsim.torch
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(20, 3, generator=g, dtype=torch.float64); y = torch.randn(20, dtype=torch.float64)
        >>> net = torch.nn.Linear(3, 1, bias=False).double()
        >>> mse = lambda out, t: 0.5 * ((out.squeeze(-1) - t) ** 2).mean()
        >>> system = rdsim.torch.OptimizerMap(net, mse, (X, y), rdsim.optim.gd(0.3))
        >>> res = rdsim.lyapunov_spectrum(system, None, 100, transient=200)
        >>> alpha = np.linalg.eigvalsh((X.T @ X).numpy() / 20)
        >>> bool(np.allclose(res.exponents, np.sort(np.log(np.abs(1 - 0.3 * alpha)))[::-1], atol=1e-10))
        True

    References:
        Tuci, Korkmaz, Simsekli, Birdal, "Generalization at the Edge of Stability", arXiv 2604.19740
        (SGD as a random dynamical system); Benettin, Galgani, Giorgilli, Strelcyn (1980) (QR method).
    """

    backend = "torch"

    def __init__(self, model: nn.Module, loss_fn: Callable, data, optimizer: OptimizerSpec, *,
                 device=None, dtype=None, chunk_size: int | None = None, tangent: str = "exact",
                 record=None, compile: bool = False, qr: str = "cholesky", hvp: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a function loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        if not isinstance(optimizer, OptimizerSpec):
            raise TypeError("optimizer: expected a spec from rdsim.optim (gd, sgd, momentum, adam), "
                            f"got {type(optimizer).__name__}")
        if tangent not in ("exact", "frozen"):
            raise ValueError(f"tangent: expected 'exact' or 'frozen', got {tangent!r}")
        if tangent == "frozen" and optimizer.kind != "adam":
            raise ValueError("tangent: 'frozen' (I - eta P^-1 H) applies to adam only")
        if chunk_size is not None:
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
                raise ValueError(f"chunk_size: expected a positive integer or None, got {chunk_size!r}")
            chunk_size = int(chunk_size)
        check_no_dropout(model)
        fm = FlatModel(model, loss_fn, dtype=dtype, device=device, copy_constants=True)
        fm.set_hvp(hvp)
        self._fm = fm
        self.device, self.dtype = fm.device, fm.dtype
        self.model, self.loss_fn, self.spec, self.tangent_kind = model, loss_fn, optimizer, tangent
        self.chunk_size = chunk_size
        self.param_names, self.param_shapes, self._numels = fm.param_names, fm.param_shapes, fm.numels
        d = self.n_params = fm.n_params
        self._x_model = fm.flat()
        self._consts = fm.consts
        self.batchnorm_train_mode = fm.batchnorm_train_mode
        self._modes = self._training_flags()

        # data
        data = as_pair(data)
        inputs, targets = (self._data_tensor(a, nm) for a, nm in zip(data, ("inputs", "targets")))
        if inputs.ndim == 0 or targets.ndim == 0:
            raise ValueError("data: inputs and targets need a leading sample dimension")
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"data: inputs have {inputs.shape[0]} samples but targets have "
                             f"{targets.shape[0]} (dimension 0 must match)")
        self.n_samples = n = int(inputs.shape[0])
        if n == 0:
            raise ValueError("data: no samples")
        check_finite_data(inputs, targets)
        optimizer.check_data_size(n)
        self.inputs, self.targets = inputs, targets

        # the interface
        self.dim = d * (1 + optimizer.n_buffers)
        self._tangent_dim = d if tangent == "frozen" else self.dim
        self._b = optimizer.batch_size or 0
        self.noise_dim = self._b + (1 if optimizer.kind == "adam" else 0)
        self.dt = 1.0
        self.name = f"{optimizer.label()} on {type(model).__name__}"
        self.n_jvp = 0
        self.n_hvp = 0
        self._records_spec = self._parse_record(record)
        self.records: dict[str, list] = {}
        self._run_noise = None
        self._run_step = 0
        self._hyper = hyper_from_spec(optimizer)
        if qr not in QR_METHODS:
            raise ValueError(f"qr: expected one of {QR_METHODS}, got {qr!r}")
        self.qr = qr
        if not isinstance(compile, bool):
            raise TypeError(f"compile: expected True or False, got {type(compile).__name__}")
        self._compiled = None
        self.compile_error: str | None = None

        self._probe()
        fm.check_hvp(hvp)
        if compile:
            self._compiled = torch.compile(functools.partial(self._advance_eager, mode=COMPILED_HVP_MODE), dynamic=False)

    def _compile_failed(self, err: BaseException) -> None:
        self._compiled = None
        self.compile_error = f"{type(err).__name__}: {err}"
        first_line = self.compile_error.splitlines()[0][:300]
        warnings.warn(f"compile=True: torch.compile could not compile the update and its tangent "
                      f"({first_line}); running eagerly instead", RuntimeWarning, stacklevel=3)

    # -- helpers ---------------------------------------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(device=self.device)

    def _data_tensor(self, a, name) -> torch.Tensor:
        if not isinstance(a, torch.Tensor):
            try:
                a = torch.as_tensor(np.asarray(a))
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"data: {name} must be a tensor or an array, got {type(a).__name__}") from err
        return self._cast(a.detach())

    def _training_flags(self):
        return tuple(m.training for m in self.model.modules())

    def _check_modes(self):
        if self._training_flags() != self._modes:
            raise RuntimeError("model: its train/eval flags changed after the map was built; the BatchNorm "
                               "and dropout policy is fixed at construction, so build a new OptimizerMap")

    def _parse_record(self, record):
        if record is None:
            return {}
        if callable(record):
            record = {"callback": (record, 1)}
        if not isinstance(record, dict):
            raise TypeError("record: expected a dict {name: every} (names: loss, batch_loss, sharpness, "
                            f"checkpoints, or name: (fn, every)) or a callable, got {type(record).__name__}")
        spec = {}
        for name, val in record.items():
            opts: dict = {}
            fn = None
            if isinstance(val, tuple):
                if len(val) != 2:
                    raise ValueError(f"record: {name!r}: expected every, (every, options) or (fn, every)")
                if callable(val[0]):
                    fn, val = val
                else:
                    val, opts = val
                    if not isinstance(opts, dict):
                        raise ValueError(f"record: {name!r}: options must be a dict")
            if fn is None and name not in _RECORD_KINDS:
                raise ValueError(f"record: unknown record {name!r}; built-in ones are {_RECORD_KINDS}, "
                                 "custom ones are given as name: (fn, every)")
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"record: {name!r}: expected a positive integer interval, got {val!r}")
            spec[name] = (int(val), fn, opts)
        return spec

    def _params(self, x: torch.Tensor) -> dict:
        return self._fm.params(x)

    def param_dict(self, z) -> dict[str, torch.Tensor]:
        """The parameters of state ``z`` (array or tensor; parameters or full state) as {name: tensor}."""
        z = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z)
        z = z.to(device=self.device, dtype=self.dtype).reshape(-1)
        return {n: t.clone() for n, t in self._params(z[:self.n_params]).items()}

    def load_into(self, model: nn.Module, z) -> nn.Module:
        """Copy the parameters of state ``z`` into ``model`` (same architecture) in place; returns it."""
        params = self.param_dict(z)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in params:
                    p.copy_(params[n].to(device=p.device, dtype=p.dtype))
        return model

    def _loss(self, x: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return self._fm.loss(x, xb, yb)

    def _probe(self):
        b = self._b or self.n_samples
        xb, yb = self.inputs[:b], self.targets[:b]
        shape = tuple(self.inputs.shape)
        try:
            with torch.no_grad():
                out = functional_call(self.model, (self._params(self._x_model), self._consts), (xb,))
        except Exception as err:  # noqa: BLE001 - the user's model failed on the data
            raise ValueError(f"data: the model cannot be applied to inputs of shape {shape} "
                             f"(dtype {self.inputs.dtype}): {type(err).__name__}: {err}") from err
        try:
            with torch.no_grad():
                loss = self.loss_fn(out, yb)
        except Exception as err:  # noqa: BLE001 - the user's loss failed
            out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"loss_fn: failed on model outputs of shape {out_shape} and targets of shape "
                             f"{tuple(yb.shape)}: {type(err).__name__}: {err}") from err
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"loss_fn: must return a scalar tensor (the mean loss), returned {type(loss).__name__}")
        if loss.numel() != 1 or loss.ndim != 0:
            raise ValueError(f"loss_fn: must return a scalar (the mean loss over the batch), returned a "
                             f"tensor of shape {tuple(loss.shape)}; reduce it with .mean()")
        if not loss.is_floating_point():
            raise ValueError(f"loss_fn: must return a floating-point scalar, got dtype {loss.dtype}")
        with torch.no_grad():
            again = self.loss_fn(functional_call(self.model, (self._params(self._x_model), self._consts), (xb,)), yb)
        if not torch.equal(loss, again) and not (torch.isnan(loss) and torch.isnan(again)):
            raise ValueError("model: two identical forward passes gave different losses "
                             f"({float(loss)!r} vs {float(again)!r}); the step must be a deterministic "
                             "function of (parameters, minibatch): switch off dropout or other randomness")
        # one tangent push: every op of model and loss needs second derivatives (either scheme)
        z = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        z[:self.n_params] = self._x_model
        if self.spec.kind == "adam":
            z[2 * self.n_params:] = 1.0
        try:
            self._advance_eager(z, torch.ones((1, self.tangent_dim), device=self.device, dtype=self.dtype), xb, yb, 1.0)
        except RuntimeError as err:
            raise ValueError(f"loss_fn/model: the tangent map needs second derivatives of the loss: {err}") from err
        self.n_jvp = 0

    # -- the update ------------------------------------------------------------------------------
    def _batch(self, idx):
        if idx is None:
            return self.inputs, self.targets
        return self.inputs.index_select(0, idx), self.targets.index_select(0, idx)

    def _grad(self, x, xb, yb):
        """(gradient of the minibatch loss L_B at x, loss); weight decay belongs to the update."""
        return self._fm.grad(x, xb, yb)

    def _update(self, z, xb, yb, t):
        """f(z, B, t) and the minibatch loss."""
        g, loss = self._grad(z[:self.n_params], xb, yb)
        return _upd.update(self._hyper, z, g, t), loss

    def _grad_hvp(self, x, Vx, xb, yb, mode=None):
        """(g, H_B V, loss) for the rows of Vx (k, d): :meth:`FlatModel.grad_hvp` in chunks of ``chunk_size``."""
        return self._fm.grad_hvp(x, Vx, xb, yb, self.chunk_size, mode)

    @property
    def hvp_mode(self) -> str:
        """How the Hessian-vector products are taken eagerly: "mlp" (written out for a recognised
        fully connected chain, :mod:`rdsim.torch._mlp`), "reverse" (reverse-over-reverse), or
        "forward" (forward-over-reverse, also where an operation has no double backward); always
        "forward" inside ``compile=True`` (see :meth:`rdsim.torch._functional.FlatModel.grad_hvp`)."""
        return self._fm.hvp_mode

    def _advance_eager(self, z, Vt, xb, yb, t, mode=None):
        """(f(z), Df(z) V, loss) for a (k, tangent_dim) block Vt of tangent rows.

        Exact tangent: one batched HVP block H_B V_x, then the derivative of the update with
        respect to (z, g) applied to (V, H_B V_x) (:func:`rdsim.torch._update.tangent`).
        ``tangent="frozen"`` (Adam only): V' = (1 - lr wd_decoupled) V - lr (H V + wd_L2 V) / (sqrt(v_hat') + eps).
        """
        d, h = self.n_params, self._hyper
        if self.tangent_kind == "exact":
            g, TV, loss = self._fm.grad_tangent(h, z, Vt, xb, yb, self.chunk_size, t, mode)
            return _upd.update(h, z, g, t), TV, loss
        g, HV, loss = self._grad_hvp(z[:d], Vt[:, :d], xb, yb, mode)
        z_new = _upd.update(h, z, g, t)
        if h.weight_decay:
            HV = torch.add(HV, Vt, alpha=h.weight_decay)
        den = torch.sqrt(z_new[2 * d:] / (1.0 - h.beta2 ** t)) + h.eps
        shrink = 1.0 - h.lr * h.decoupled_wd
        return z_new, shrink * Vt - h.lr * (HV / den), loss

    def _advance(self, z, Vt, xb, yb, t):
        """(f(z), Df(z) V, loss); through ``torch.compile`` when the map was built with compile=True."""
        if self._compiled is not None:
            try:
                with _quiet_jit_script():  # outside the compiled region: no graph break
                    out = self._compiled(z, Vt, xb, yb, torch.as_tensor(float(t), dtype=torch.float64, device=self.device))
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
                self._compile_failed(err)
            else:
                self.n_jvp += Vt.shape[0]
                return out
        self.n_jvp += Vt.shape[0]
        return self._advance_eager(z, Vt, xb, yb, t)

    # -- the AbstractSystem interface ------------------------------------------------------------
    @property
    def tangent_dim(self) -> int:
        return self._tangent_dim

    def noise_sampler(self, rng):
        """Same as the numba backend: minibatch indices, preceded by the step counter for Adam."""
        return noise_sampler(self.spec, self.n_samples, rng)

    def sample_noise(self, rng, n):
        """The noise of the first n steps for a fresh generator (see :meth:`noise_sampler`)."""
        return self.noise_sampler(rng)(n)

    def _split_xi(self, xi):
        """(batch indices on the device or None, t) from one host noise vector."""
        if xi is None:
            xi = np.empty(0)
        xi = np.asarray(xi, dtype=np.float64).reshape(-1)
        if xi.shape[0] != self.noise_dim:
            raise ValueError(f"xi: expected length {self.noise_dim}, got {xi.shape[0]}")
        t = 1.0
        if self.spec.kind == "adam":
            t, xi = float(xi[0]), xi[1:]
            if not t >= 1:
                raise ValueError(f"xi: Adam's step counter xi[0] must be >= 1, got {t}")
        if self._b == 0:
            return None, t
        idx = xi.astype(np.int64)
        if np.any(idx != xi) or idx.min() < 0 or idx.max() >= self.n_samples:
            raise ValueError(f"xi: minibatch indices must be integers in [0, {self.n_samples})")
        return torch.as_tensor(idx, device=self.device), t

    def _state_tensor(self, x) -> torch.Tensor:
        z = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64)).to(device=self.device, dtype=self.dtype)
        if z.shape != (self.dim,):
            raise ValueError(f"x: expected shape ({self.dim},), got {tuple(z.shape)}")
        return z

    def step(self, x, xi=None):
        """f(x, xi) as a float64 numpy array (computed in the map's dtype on its device)."""
        z = self._state_tensor(x)
        idx, t = self._split_xi(xi)
        xb, yb = self._batch(idx)
        z_new, _ = self._update(z, xb, yb, t)
        return z_new.detach().to(torch.float64).cpu().numpy()

    def tangent(self, x, xi, V):
        """Df(x, xi) @ V for a (tangent_dim, k) numpy block V; float64 numpy out."""
        V = np.asarray(V, dtype=np.float64)
        if V.ndim != 2 or V.shape[0] != self.tangent_dim:
            raise ValueError(f"V: expected shape ({self.tangent_dim}, k), got {V.shape}")
        z = self._state_tensor(x)
        idx, t = self._split_xi(xi)
        xb, yb = self._batch(idx)
        Vt = torch.as_tensor(np.ascontiguousarray(V.T)).to(device=self.device, dtype=self.dtype)
        _, TV, _ = self._advance(z, Vt, xb, yb, t)
        return TV.detach().T.to(torch.float64).cpu().numpy()

    def jacobian(self, x, xi=None):
        return self.tangent(x, xi, np.eye(self.tangent_dim))

    def initial_state(self, x0) -> np.ndarray:
        """x0 None: the model's parameters (optimizer buffers zero); else parameters only or the full state."""
        d = self.n_params
        if x0 is None:
            x = np.array(self._x_model.detach().to(torch.float64).cpu().numpy(), dtype=np.float64)  # a copy
        else:
            try:
                if isinstance(x0, torch.Tensor):
                    x0 = x0.detach().to(torch.float64).cpu().numpy()
                x = np.array(x0, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError) as err:
                raise TypeError("x0: expected an array of real numbers") from err
        if x.shape[0] == d and self.dim != d:
            x = np.concatenate([x, np.zeros(self.dim - d)])
        if x.shape != (self.dim,):
            raise ValueError(f"x0: expected the parameters, shape ({d},), or the full optimizer state, "
                             f"shape ({self.dim},); got {np.shape(x0)}")
        if not np.all(np.isfinite(x)):
            raise ValueError("x0: must be finite")
        if self.spec.kind == "adam" and np.any(x[2 * d:] < 0):
            raise ValueError("x0: Adam's second-moment buffer v (last d entries) must be non-negative")
        return np.ascontiguousarray(x)

    @property
    def x0(self) -> np.ndarray:
        """The default initial state: the model's parameters at construction, buffers zero."""
        return self.initial_state(None)

    # -- losses and curvature at a state ---------------------------------------------------------
    def loss(self, z=None, idx=None) -> float:
        """The loss at state z (default: the model's parameters) on the samples idx (None: all)."""
        zt = self._state_tensor(self.initial_state(z)) if not isinstance(z, torch.Tensor) else z
        xb, yb = self._batch(None if idx is None else torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device))
        with torch.no_grad():
            return float(self._loss(zt[:self.n_params], xb, yb))

    def sharpness(self, z=None, *, n_iter: int = 20, seed: int = 0) -> float:
        """lambda_max of the full-data Hessian at state z by Lanczos (``n_iter`` HVPs, full reorthogonalisation)."""
        zt = self._state_tensor(self.initial_state(z)) if not isinstance(z, torch.Tensor) else z
        x = zt[:self.n_params].detach()
        xb, yb = self.inputs, self.targets

        def hvp(V):  # (n, k) float64 -> H V
            self.n_hvp += V.shape[1]
            return self._grad_hvp(x, V.T.to(self.dtype), xb, yb)[1].T

        return float(lanczos(hvp, 1, n=self.n_params, n_iter=n_iter, seed=seed, device=self.device).eigenvalues[0])

    # -- records ---------------------------------------------------------------------------------
    def _start_run(self, noise):
        if noise is not self._run_noise:
            self._run_noise = noise
            self._run_step = 0
            self.records = {}
            for name in self._records_spec:
                self.records[name] = []
                self.records[name + "_steps"] = []

    def _record(self, s, z, batch_loss=None):
        for name, (every, fn, opts) in self._records_spec.items():
            if s % every:
                continue
            if fn is not None:
                val = fn(s, z.detach(), self)
            elif name == "loss":
                with torch.no_grad():
                    val = float(self._loss(z[:self.n_params], self.inputs, self.targets))
            elif name == "batch_loss":
                if batch_loss is None:
                    continue  # after the last step there is no minibatch
                val = float(batch_loss)
            elif name == "sharpness":
                val = self.sharpness(z, **opts)
            else:  # checkpoints
                val = z[:self.n_params].detach().to(torch.float64).cpu().numpy().copy()
            if val is None:
                continue
            steps = self.records[name + "_steps"]
            if name == "batch_loss" or not steps or steps[-1] != s:
                self.records[name].append(val)
                steps.append(s)

    def _trim_records(self, last_step):
        for name in self._records_spec:
            steps, vals = self.records[name + "_steps"], self.records[name]
            while steps and steps[-1] > last_step:
                steps.pop()
                vals.pop()

    # -- the QR loop on the device ---------------------------------------------------------------
    def _run_phase(self, x, Q, noise, n_total, qr_every, accumulate, n_blocks, record_every, state,
                   hist_count, bar):
        """The loop of :func:`rdsim._lyapunov._run_python`, kept on the map's device.

        Same algorithm, bookkeeping and return values; ``x``, ``Q`` and the numpy accumulators in
        ``state`` are updated at the end. The state z and the block (k rows) stay in the map's
        dtype; the block is factorised by Cholesky QR on the device (:func:`rdsim.torch._qr.cholqr_rows`:
        Gram in the block's dtype, float64 factor; Householder in float64 with ``qr="householder"``),
        and the logs |R_ii| are accumulated in float64 on the device.

        Per step the loop does one batched tangent push and, every ``qr_every`` steps, one QR;
        minibatches are gathered on the device once per window of :data:`SYNC_EVERY` steps from
        the pre-drawn indices. Nothing waits for the device inside a window: at its end the host
        looks once at the finiteness of the state, the block, the sums and the losses, and at the
        health of the Cholesky QR factorisations. If anything failed, the window is replayed from
        a snapshot taken at its start, step by step with checks and Householder QR, which finds
        the exact step of a divergence (status "diverged", the state and block before it), or
        recovers from an ill-conditioned block (the rest of the phase then uses Householder).
        """
        self._check_modes()
        self._start_run(noise)
        dev, f64 = self.device, torch.float64
        run_step0 = self._run_step
        ls = _LoopState(
            z=self._state_tensor(x).clone(),
            Q=torch.as_tensor(np.ascontiguousarray(Q.T)).to(device=dev, dtype=self.dtype).clone(),
            sums=torch.as_tensor(state["sums"]).to(dev).clone(),
            bsums=torch.as_tensor(state["block_sums"]).to(dev).clone(),
            bsteps=np.array(state["block_steps"], dtype=np.float64),
            hist_steps=np.array(state["hist_steps"]), hist_count=hist_count,
            worst=torch.zeros((), dtype=f64, device=dev))
        hist_dev = torch.zeros((state["hist"].shape[0], ls.Q.shape[0]), dtype=f64, device=dev)
        hist0 = hist_count
        householder = self.qr == "householder"
        args = (n_total, qr_every, accumulate, n_blocks, record_every, hist_dev, run_step0)
        done, status, fail_at = 0, OK, -1
        while done < n_total:
            n = min(SYNC_EVERY, n_total - done)
            xi = noise.take(n)
            snapshot = ls.copy()
            status, fail_at = self._window(ls, xi, done, *args, careful=False, householder=householder)
            if status != OK:  # replay the window with checks at every step
                ls = snapshot
                if self._records_spec:
                    self._trim_records(run_step0 + done - 1)
                status, fail_at = self._window(ls, xi, done, *args, careful=True, householder=True)
                if status != OK:
                    break
                householder = True
            done += n
            if bar is not None:
                bar.update(n)
        if status == OK and self._records_spec and accumulate:
            self._record(run_step0 + n_total, ls.z)
        if status != OK and self._records_spec:
            self._trim_records(run_step0 + fail_at)
        self._run_step = run_step0 + (n_total if status == OK else fail_at)
        self.qr_fallback = householder and self.qr != "householder"
        x[:] = ls.z.to(f64).cpu().numpy()
        Q[:, :] = ls.Q.T.to(f64).cpu().numpy()
        state["sums"][:] = ls.sums.cpu().numpy()
        state["block_sums"][:, :] = ls.bsums.cpu().numpy()
        state["block_steps"][:] = ls.bsteps
        state["hist_steps"][:] = ls.hist_steps
        state["n_qr"] = state.get("n_qr", 0) + ls.n_qr
        rs = state.get("rank_stats")
        if rs is not None and status == OK:
            rs[0] = min(float(rs[0]), math.exp(float(ls.worst)))
        hist_count = ls.hist_count
        if hist_count > hist0:
            state["hist"][hist0:hist_count] = hist_dev[hist0:hist_count].cpu().numpy()
        return status, fail_at, hist_count

    def _window(self, ls, xi, g0, n_total, qr_every, accumulate, n_blocks, record_every, hist_dev,
                run_step0, *, careful, householder):
        """Steps g0 .. g0 + len(xi) - 1 of a phase; updates ``ls``. Returns (status, failing step).

        ``careful=False``: no host synchronisation until the end, where one combined check
        returns (RETRY, -1) if anything is non-finite or a Cholesky QR was flagged (``ls`` is
        then partly advanced and must be discarded). ``careful=True``: checks after every step
        and returns the status of the first failure, with ``ls`` as it was before that step
        (the state advanced if only the tangent block failed, as the reference loop does).
        """
        n = xi.shape[0]
        dev = self.device
        adam = self.spec.kind == "adam"
        if self._b:
            idx = torch.as_tensor(xi[:, (1 if adam else 0):].astype(np.int64)).to(dev)
            Xw, Yw = self.inputs[idx], self.targets[idx]  # (n, b, ...): one gather per window
        rec = bool(self._records_spec)
        batch_loss_rec = "batch_loss" in self._records_spec
        losses, health = [], []
        for r in range(n):
            g = g0 + r
            xb, yb = (Xw[r], Yw[r]) if self._b else (self.inputs, self.targets)
            t = float(xi[r, 0]) if adam else 1.0
            z_new, TV, loss = self._advance(ls.z, ls.Q, xb, yb, t)
            if rec:
                self._record(run_step0 + g, ls.z, loss if batch_loss_rec else None)
            if careful:
                if not bool(torch.isfinite(z_new).all() & torch.isfinite(loss)):
                    return STATE_NONFINITE, g
            else:
                losses.append(loss.detach())
            ls.z = z_new.detach()
            V = TV.detach()
            ls.since_qr += 1
            last = g + 1 == n_total
            if ls.since_qr == qr_every or last:
                if careful and not bool(torch.isfinite(V).all()):
                    return TANGENT_NONFINITE, g
                if householder:
                    Qn, logd = householder_rows(V, self.dtype)
                else:
                    Qn, logd, ok = cholqr_rows(V)
                    health.append(ok)
                if careful and not bool(torch.isfinite(logd).all()):  # |R_ii| = 0 gives -inf
                    return TANGENT_NONFINITE, g
                ls.Q = Qn
                ls.n_qr += 1
                # the block's conditioning, as the numba loop records it (no host synchronisation)
                gap = logd.min() - logd.max()
                ls.worst = torch.minimum(ls.worst, torch.nan_to_num(gap, nan=0.0))
                if accumulate:
                    b = (g * n_blocks) // n_total
                    ls.sums += logd
                    ls.bsums[b] += logd
                    ls.bsteps[b] += ls.since_qr
                    done = g + 1
                    if record_every > 0 and (done % record_every == 0 or last) and ls.hist_count < hist_dev.shape[0]:
                        hist_dev[ls.hist_count] = ls.sums / done
                        ls.hist_steps[ls.hist_count] = done
                        ls.hist_count += 1
                ls.since_qr = 0
            else:
                ls.Q = V
        if careful:
            return OK, -1
        fine = torch.isfinite(ls.z).all() & torch.isfinite(ls.Q).all() & torch.isfinite(ls.sums).all()
        if losses:
            fine = fine & torch.isfinite(torch.stack(losses)).all()
        if health:
            fine = fine & torch.stack(health).all()
        return (OK, -1) if bool(fine) else (_RETRY, -1)


_RETRY = -2


@dataclasses.dataclass
class _LoopState:
    """What the device loop carries from step to step (see :meth:`OptimizerMap._run_phase`)."""

    z: torch.Tensor
    Q: torch.Tensor  # (k, tangent_dim) rows in the map's dtype
    sums: torch.Tensor
    bsums: torch.Tensor
    bsteps: np.ndarray
    hist_steps: np.ndarray
    hist_count: int
    since_qr: int = 0
    n_qr: int = 0
    worst: torch.Tensor | None = None  # min over QRs of log(min|R_ii| / max|R_ii|), float64

    def copy(self) -> "_LoopState":
        # z and Q are replaced, never written in place; the accumulators are written in place
        return dataclasses.replace(self, sums=self.sums.clone(), bsums=self.bsums.clone(),
                                   bsteps=self.bsteps.copy(), hist_steps=self.hist_steps.copy())
