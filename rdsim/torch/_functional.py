"""A module's loss as a pure function of one flat parameter vector (private).

:class:`FlatModel` is shared by :class:`rdsim.torch.OptimizerMap` (the state it iterates) and
:class:`rdsim.torch.TrainingMonitor` (the state a user's optimizer iterates): the trainable
parameters are viewed as one flat vector x (``model.named_parameters()`` order), the model is
evaluated with ``torch.func.functional_call`` (frozen parameters and buffers passed alongside as
constants), and gradients and batched Hessian-vector products are taken by ``torch.func``.

BatchNorm policy: a ``_NormBase`` module with running statistics in **train mode** uses the
statistics of the current batch (the map that training follows); its running statistics are passed
as None, so they are neither read nor written. In **eval mode** they are constants.
Dropout in train mode is refused by the callers (:func:`dropout_modules`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap
from . import _update as _upd
from ._data import resolve_device
from ._mlp import chain_grad_hvp, check_chain, detect_chain

__all__ = ["FlatModel", "dropout_modules", "check_no_dropout", "grad_hvp_rows", "grad_hvp_auto", "hvp_rows_per_batch",
           "with_hvp_fallback", "grad_hvp_chain_or_auto", "ensure_chain", "chain_products", "HVP_MODES", "HVP_CHOICES"]


def dropout_modules(model: nn.Module):
    """(name, module) of the modules of ``model`` that apply dropout in train mode."""
    for name, mod in model.named_modules():
        if not mod.training:
            continue
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            yield name or type(mod).__name__, mod
        elif isinstance(mod, nn.MultiheadAttention) and mod.dropout > 0:
            yield name or type(mod).__name__, mod


def check_no_dropout(model: nn.Module, what: str = "the map") -> None:
    for name, mod in dropout_modules(model):
        raise ValueError(f"model: module {name!r} ({type(mod).__name__}) applies dropout in train "
                         "mode, which makes the step random beyond the minibatch; call model.eval() "
                         f"(or set its p to 0) before building {what}")


class FlatModel:
    """The trainable parameters of ``model`` as a flat vector and ``loss_fn`` as a function of it.

    Args:
        model: the network; never modified.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar mean loss.
        params: the parameters that form the state (default: those with ``requires_grad``), in
            ``model.named_parameters()`` order whatever order they are given in; the others are
            constants.
        dtype, device: of the evaluation (default: the parameters').
        copy_constants: clone buffers and frozen parameters (a snapshot, as OptimizerMap takes);
            False keeps references, so the constants follow the live model (TrainingMonitor).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, params: Sequence[torch.Tensor] | None = None,
                 dtype=None, device=None, copy_constants: bool = True):
        if params is None:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        else:
            ids = {id(p) for p in params}
            named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
        if not named:
            raise ValueError("model: has no trainable parameters (requires_grad=True)")
        if dtype is None:
            dtype = next((p.dtype for _, p in named if p.is_floating_point()), torch.get_default_dtype())
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: expected a floating torch dtype, got {dtype!r}")
        device = resolve_device(device, named[0][1].device)
        self.device, self.dtype = torch.device(device), dtype
        self.model, self.loss_fn = model, loss_fn
        self.named_params = named
        self.param_names = [n for n, _ in named]
        self.param_shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.n_params = sum(self.numels)
        consts: dict[str, Any] = {}
        state = set(self.param_names)
        for n, p in model.named_parameters():
            if n not in state:
                consts[n] = self.cast(p.detach().clone() if copy_constants else p.detach())
        for n, b in model.named_buffers():
            consts[n] = self.cast(b.detach().clone() if copy_constants else b.detach())
        self.batchnorm_train_mode = []
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.training and mod.track_running_stats:
                self.batchnorm_train_mode.append(mname)
                for b in ("running_mean", "running_var", "num_batches_tracked"):
                    key = f"{mname}.{b}" if mname else b
                    if key in consts:
                        consts[key] = None
        self.consts = consts

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(device=self.device)

    def flat(self) -> torch.Tensor:
        """The model's current parameters as one flat tensor (a copy, in the evaluation dtype)."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for _, p in self.named_params]).to(device=self.device, dtype=self.dtype)

    def flat_of(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate per-parameter tensors (None: zeros) in the flat layout."""
        parts = [torch.zeros(n, device=self.device, dtype=self.dtype) if t is None
                 else t.detach().reshape(-1).to(device=self.device, dtype=self.dtype)
                 for t, n in zip(tensors, self.numels)]
        return torch.cat(parts)

    def params(self, x: torch.Tensor) -> dict:
        return {n: t.view(s) for n, t, s in zip(self.param_names, x.split(self.numels), self.param_shapes)}

    def loss(self, x: torch.Tensor, xb, yb) -> torch.Tensor:
        out = functional_call(self.model, (self.params(x), self.consts), (xb,))
        return self.loss_fn(out, yb)

    def grad(self, x, xb, yb):
        """(gradient of the batch loss at x, loss)."""
        return grad_and_value(self.loss)(x, xb, yb)

    #: the scheme :meth:`grad_hvp` uses when none is asked for: "reverse" (see :func:`grad_hvp_auto`),
    #: "forward" after a fallback, or "mlp" once the loss is recognised as a fully connected chain
    hvp_mode = "reverse"
    #: whether :meth:`grad_hvp` looks for a fully connected chain on first use (:mod:`rdsim.torch._mlp`)
    try_chain = True
    #: the recognised chain (None: not looked for yet; False: not a chain, ``chain_reason`` says why)
    chain = None
    chain_reason = ""

    def grad_hvp(self, x, Vx, xb, yb, chunk_size: int | None = None, mode: str | None = None):
        """(g, H V, loss): the gradient of the batch loss at x and its Hessian applied to the rows
        of Vx (k, d), by :func:`grad_hvp_rows` (``mode`` given) or with :attr:`hvp_mode` (None).

        With ``mode=None`` the first call looks for a chain of ``Linear`` layers and elementwise
        activations ending in mean cross-entropy or MSE (:func:`rdsim.torch._mlp.detect_chain`:
        by structure, then checked against :func:`grad_hvp_auto` at that point); if it finds one,
        ``hvp_mode`` becomes "mlp" and the products are written out (:func:`rdsim.torch._mlp.chain_grad_hvp`).
        """
        if mode is None:
            return grad_hvp_chain_or_auto(self, self.loss, self.numels, self.param_shapes, x, Vx, xb, yb, chunk_size)
        if mode == "mlp":
            return chain_products(self, x, Vx, xb, yb, chunk_size)
        return grad_hvp_rows(self.loss, x, Vx, xb, yb, chunk_size, mode)

    def grad_tangent(self, h: "_upd.Hyper", z, V, xb, yb, chunk_size: int | None = None, t=1.0,
                     mode: str | None = None):
        """(g, Df(z) V, loss): the gradient at x = z[:d] and the exact tangent of the update ``h``
        applied to the rows of V (k, len(z)), the one tangent push of OptimizerMap and TrainingMonitor.

        Plain SGD (float lr, no weight decay) on a written-out chain gets V - lr H V from the chain
        itself (``chain_products(sgd_lr=lr)``, bitwise the same values); otherwise :meth:`grad_hvp`
        and :func:`rdsim.torch._update.tangent`.
        """
        if (mode in (None, "mlp") and self.hvp_mode == "mlp" and h.kind == "sgd" and isinstance(h.lr, float)
                and _upd._is_zero(h.weight_decay)):
            return chain_products(self, z, V, xb, yb, chunk_size, sgd_lr=h.lr)
        d = self.n_params
        g, HV, loss = self.grad_hvp(z[:d], V[:, :d], xb, yb, chunk_size, mode)
        return g, _upd.tangent(h, z, g, V, HV, t), loss

    def set_hvp(self, hvp: str) -> None:
        """Apply a user's ``hvp=`` choice ("auto", "mlp", "reverse", "forward") before the first product."""
        if hvp not in HVP_CHOICES:
            raise ValueError(f"hvp: expected one of {HVP_CHOICES}, got {hvp!r}")
        self.try_chain = hvp in ("auto", "mlp")
        if hvp == "forward":
            self.hvp_mode = "forward"

    def check_hvp(self, hvp: str) -> None:
        """After the first product: ``hvp="mlp"`` must have found its chain."""
        if hvp == "mlp" and self.hvp_mode != "mlp":
            raise ValueError("hvp: 'mlp' needs a chain of Linear layers and elementwise activations ending in "
                             f"mean cross-entropy or MSE; this model and loss are not one ({self.chain_reason}); "
                             "use hvp='auto'")


@contextlib.contextmanager
def _quiet_jit_script():
    """Silence torch.func's "torch.jit.script is deprecated" warning (it scripts a few forward-AD
    decompositions on first use: torch's internals, not the user's). Inside ``torch.compile`` the
    warnings filter is left alone: changing it is a graph break (3 graphs instead of 1 for the
    compiled tangent push)."""
    if torch.compiler.is_compiling():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        yield


HVP_MODES = ("reverse", "forward")
#: the ``hvp=`` choices of OptimizerMap and TrainingMonitor
HVP_CHOICES = ("auto", "mlp", "reverse", "forward")


def grad_hvp_rows(loss, x, Vx, xb, yb, chunk_size: int | None = None, mode: str = "reverse"):
    """(g, H V, L): gradient and Hessian of ``loss(x, xb, yb)`` (a scalar) at x, H applied to the rows of Vx (k, d).

    The one implementation of batched Hessian-vector products on the torch side
    (:class:`FlatModel`, hence OptimizerMap and TrainingMonitor, and HessianOperator), in chunks
    of ``chunk_size`` rows (default: all at once), by one of two exact schemes (the same products
    to rounding). On the benchmark MLP (26k parameters, 2 CPU threads, 2026-12-07) reverse is
    1.2-1.5x faster eagerly in float32 and float64 at k = 1...32; under ``torch.compile`` forward
    is as fast and compiles about 5x faster.

    * ``mode="reverse"`` (reverse-over-reverse): one ``vjp`` of the gradient, whose pullback is
      ``vmap``-ed over the rows; the primal forward and backward pass is done once.
    * ``mode="forward"`` (forward-over-reverse): ``vmap`` over ``jvp(grad)``. Floating targets
      enter the jvp as primals with explicit zero tangents: losses such as ``F.mse_loss`` fail
      under forward-over-reverse when the target has no tangent ("ZeroTensors are immutable"),
      and mixed dual/plain arithmetic is slower.
    """
    k = Vx.shape[0]
    cs = chunk_size or k
    gfn = grad_and_value(loss)
    if mode == "reverse":
        g, pull, val = vjp(lambda xx: gfn(xx, xb, yb), x, has_aux=True)
        outs = [vmap(pull)(Vx[s:s + cs])[0] for s in range(0, k, cs)]
        return g, (outs[0] if len(outs) == 1 else torch.cat(outs)), val
    if mode != "forward":
        raise ValueError(f"mode: expected one of {HVP_MODES}, got {mode!r}")
    dual_t = isinstance(yb, torch.Tensor) and yb.is_floating_point()
    ty = torch.zeros_like(yb) if dual_t else None

    def push(v):
        if dual_t:
            return jvp(lambda xx, yy: gfn(xx, xb, yy), (x, yb), (v, ty), has_aux=True)
        return jvp(lambda xx: gfn(xx, xb, yb), (x,), (v,), has_aux=True)

    outs = []
    g = val = None
    with _quiet_jit_script():
        for s in range(0, k, cs):
            g, hv, val = vmap(push, out_dims=(None, 0, None))(Vx[s:s + cs])
            outs.append(hv)
    return g, (outs[0] if len(outs) == 1 else torch.cat(outs)), val


def hvp_rows_per_batch(loss, x, V, Xs, ys, chunk_size: int | None = None, mode: str = "reverse"):
    """Row r of V (k, d) times the Hessian of ``loss(x, Xs[r], ys[r])`` at x (equal-size batches), vmapped jointly.

    The per-row-batch form of :func:`grad_hvp_rows` (lockstep SLQ with a minibatch per run): the
    same two schemes, each row with its own primal pass.
    """
    k = V.shape[0]
    cs = chunk_size or k
    if mode == "reverse":
        def one(v, X, y):
            _, pull = vjp(lambda xx: grad(loss)(xx, X, y), x)
            return pull(v)[0]
    elif mode == "forward":
        dual_t = ys.is_floating_point()

        def one(v, X, y):
            def g(xx, yy):
                return grad(loss)(xx, X, yy)
            if dual_t:
                return jvp(g, (x, y), (v, torch.zeros_like(y)))[1]
            return jvp(lambda xx: g(xx, y), (x,), (v,))[1]
    else:
        raise ValueError(f"mode: expected one of {HVP_MODES}, got {mode!r}")
    with _quiet_jit_script():
        parts = [vmap(one)(V[s:s + cs], Xs[s:s + cs], ys[s:s + cs]) for s in range(0, k, cs)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def with_hvp_fallback(owner, compute):
    """``compute(mode)`` with ``owner.hvp_mode``, falling back once from reverse to forward.

    If reverse-over-reverse raises a RuntimeError (an operation without a double backward),
    forward-over-reverse is tried; if it works, ``owner.hvp_mode`` becomes "forward" for good. If
    both fail, the RuntimeError names both reasons. Out-of-memory errors are not retried.
    """
    current = owner.hvp_mode  # "mlp" owners take reverse for what the chain does not cover
    if current == "forward":
        return compute("forward")
    try:
        return compute("reverse")
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err_rev:
        try:
            out = compute("forward")
        except RuntimeError as err:
            raise RuntimeError("second derivatives of the loss are not available: reverse-over-reverse "
                               f"(torch.func.vjp over torch.func.grad): {err_rev}; forward-over-reverse "
                               f"(torch.func.jvp over torch.func.grad): {err}") from err
        if current == "reverse":
            owner.hvp_mode = "forward"
        return out


def grad_hvp_auto(owner, loss, x, Vx, xb, yb, chunk_size: int | None = None):
    """:func:`grad_hvp_rows` with ``owner.hvp_mode`` (:func:`with_hvp_fallback`)."""
    return with_hvp_fallback(owner, lambda mode: grad_hvp_rows(loss, x, Vx, xb, yb, chunk_size, mode))


def grad_hvp_chain_or_auto(owner, loss, numels, shapes, x, Vx, xb, yb, chunk_size: int | None = None):
    """(g, H V, loss) with ``owner.hvp_mode``, looking for a fully connected chain on first use.

    ``owner`` (FlatModel, HessianOperator) carries ``hvp_mode``, ``try_chain``, ``chain`` (None: not
    looked for; False: not a chain) and ``chain_reason``. While ``hvp_mode`` is "reverse" and
    ``try_chain`` holds, the first call runs :func:`rdsim.torch._mlp.detect_chain` on this batch
    (structure from a ``make_fx`` trace of ``loss``, then the products checked against
    :func:`grad_hvp_auto` here); if it finds a chain, ``hvp_mode`` becomes "mlp" and the products
    are written out (:func:`rdsim.torch._mlp.chain_grad_hvp`), else :func:`grad_hvp_auto`.
    """
    ensure_chain(owner, loss, numels, shapes, x, xb, yb)
    if owner.hvp_mode == "mlp":
        return chain_products(owner, x, Vx, xb, yb, chunk_size)
    return grad_hvp_auto(owner, loss, x, Vx, xb, yb, chunk_size)


#: chains found so far, per model: {model: {(loss_fn, layout, repr, batch kind): Chain or reason}}
_CHAINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _chain_key(owner, numels, shapes, x, xb, yb):
    """(model, key) of :data:`_CHAINS` for ``owner`` (FlatModel or HessianOperator) on this batch."""
    model = owner.model
    return model, (owner.loss_fn, tuple(numels), tuple(map(tuple, shapes)), repr(model), x.dtype, str(x.device),
                   tuple(xb.shape[1:]), yb.dtype, yb.dim())


def ensure_chain(owner, loss, numels, shapes, x, xb, yb) -> None:
    """Look for ``owner``'s fully connected chain on the batch (xb, yb) unless done (see
    :func:`grad_hvp_chain_or_auto`); sets ``owner.chain``, ``chain_reason`` and ``hvp_mode``.

    The trace (~20-40 ms) is done once per (model, loss_fn, layout, printed structure, batch kind):
    a later owner of the same model (a TrainingMonitor's measures build a HessianOperator each
    time) reuses the structure with a fresh workspace after re-checking its products numerically
    at its own point, and traces again if that check fails.
    """
    if owner.chain is not None or not owner.try_chain or owner.hvp_mode != "reverse":
        return

    def reference(xx, V, a, b):
        return grad_hvp_auto(owner, loss, xx, V, a, b)

    model, key = _chain_key(owner, numels, shapes, x, xb, yb)
    try:
        known = _CHAINS.get(model, {}).get(key)
    except TypeError:  # an unhashable loss function: no cache
        model = known = None
    if isinstance(known, str):  # this structure was seen and is not a chain
        chain, reason = None, known
    else:
        chain = dataclasses.replace(known, ws={}) if known is not None else None
        if chain is not None and check_chain(chain, x, xb, yb, reference):
            chain = None  # the model changed since: trace it again
        if chain is not None:
            reason = "chain"
        else:
            chain, reason = detect_chain(loss, numels, shapes, x, xb, yb, reference)
            if model is not None:
                _CHAINS.setdefault(model, {})[key] = chain if chain else reason
    owner.chain, owner.chain_reason = chain or False, reason
    if chain and owner.hvp_mode == "reverse":  # (the reference may have fallen back to forward)
        owner.hvp_mode = "mlp"


def chain_products(owner, x, Vx, xb, yb, chunk_size: int | None = None, per_row: bool = False,
                   sgd_lr: float | None = None):
    """(g, H V, loss) by ``owner.chain``'s written-out products, in chunks of ``chunk_size`` rows.

    ``per_row=True``: row r of Vx times the Hessian on batch (xb[r], yb[r]) (the chain form of
    :func:`hvp_rows_per_batch`; the batches are chunked with their rows), g and loss None.
    ``sgd_lr``: return Vx - sgd_lr H V in place of H V (see :func:`rdsim.torch._mlp.chain_grad_hvp`).
    """
    if not owner.chain:
        raise ValueError(f"mode: 'mlp' needs a fully connected chain; this model/loss is not one "
                         f"({owner.chain_reason or 'not looked for'})")
    k = Vx.shape[0]
    cs = chunk_size or k
    with torch.no_grad():
        if cs >= k:
            return chain_grad_hvp(owner.chain, x, Vx, xb, yb, per_row, sgd_lr)
        parts = [chain_grad_hvp(owner.chain, x, Vx[s:s + cs], *((xb[s:s + cs], yb[s:s + cs]) if per_row else (xb, yb)),
                                per_row, sgd_lr) for s in range(0, k, cs)]
    return parts[0][0], torch.cat([p[1] for p in parts]), parts[0][2]
