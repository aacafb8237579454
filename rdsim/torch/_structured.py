"""Exact minibatch Hessian spectra through a first linear layer's structure (private; issue 10).

If the first trainable module of a network is an ``nn.Linear`` fed the raw (flattened) input, the
loss on a minibatch X_B (b x d) sees its weight W_1 (out x d) only through W_1 X_B^T (with a
trainable bias b_1: through [W_1 b_1] A^T, A = [X_B 1], d + 1 columns). Let U (d x r) be an
orthonormal basis of the row space of A (r = rank A <= b). Since A = A U U^T,
L(W_1, rest) = L~(W_1 U, rest) where L~ is the same network with first layer W~ = W_1 U (out x r)
fed A U. The map P: (W_1, rest) -> (W_1 U, rest) has orthonormal rows (P P^T = I), so
H_B = P^T H~_B P: the eigenvalues of H_B are exactly those of the reduced Hessian H~_B
(out r + rest parameters) plus N - (out r + rest) zeros (the null directions V_1 with V_1 U = 0).
Forming H~_B densely costs out r + rest HVPs of the reduced network instead of a range finder or N
dense HVPs on the full one.

Applicability is checked, never assumed: the first trainable parameter belongs to a module of type
``nn.Linear`` whose weight is trainable, not shared with another module, that is called exactly once
in a forward pass on the batch, with a 2-D input equal to the batch's inputs flattened to (b, d).
As a numerical guard, one HVP of the full network along a null direction must vanish (to 1e-8 of
||H~_B||). Anything else: :func:`structured_eigenvalues` returns None and the caller falls back.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

__all__ = ["structured_eigenvalues", "first_linear"]


def first_linear(op):
    """(module name, module, bias trainable) of the first trainable module if it is an nn.Linear whose
    weight is trainable and used by no other module; else None."""
    if not op.param_names:
        return None
    first = op.param_names[0]
    mname, _, leaf = first.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    try:
        mod = op.model.get_submodule(mname) if mname else op.model
    except AttributeError:
        return None
    if type(mod) is not nn.Linear:
        return None
    wname = f"{mname}.weight" if mname else "weight"
    bname = f"{mname}.bias" if mname else "bias"
    if wname not in op.param_names:
        return None
    bias_trainable = bname in op.param_names
    # the weight (and a trainable bias) must be held by this module only (no weight tying)
    holders = [n for n, p in op.model.named_parameters(remove_duplicate=False) if p is mod.weight]
    if len(holders) != 1:
        return None
    if bias_trainable and len([n for n, p in op.model.named_parameters(remove_duplicate=False) if p is mod.bias]) != 1:
        return None
    return mname, mod, bias_trainable


class _Capture:
    def __init__(self, mod, replace=None):
        self.mod, self.replace, self.calls, self.inputs = mod, replace, 0, []

    def __enter__(self):
        def hook(_m, args):
            self.calls += 1
            if self.replace is None:
                self.inputs.append(args[0])
                return None
            return (self.replace,) + tuple(args[1:])
        self.handle = self.mod.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _row_basis(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (columns) of the row space of A (numerical rank, numpy's default cutoff)."""
    _, s, Vh = torch.linalg.svd(A, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return A.new_zeros((A.shape[1], 0))
    cut = float(s[0]) * max(A.shape) * torch.finfo(A.dtype).eps
    return Vh[s > cut].T.contiguous()


def structured_eigenvalues(op, *, dense_max: int = 4096, rank_tol: float = 1e-9, seed: int = 0,
                           check: bool = True):
    """All eigenvalues (ascending) of the minibatch Hessian behind ``op`` via the reduced first layer.

    Args:
        op: a one-batch :class:`rdsim.torch.HessianOperator` (``on_batch``).
        dense_max: reduced Hessians up to this size are formed densely; above, the range finder
            of :func:`rdsim.torch.minibatch_hessian_eigenvalues` runs on the reduced network.
        rank_tol, seed: passed to the range finder on the reduced network.
        check: one HVP of the full network along a null direction must vanish (the guard above).

    Returns:
        (eigenvalues (N,) ascending float64, info dict with ``rank`` r, ``n_reduced``, ``n_hvp``
        (HVPs of the reduced network, plus one of the full network for the guard)) or None where
        the structure does not apply (the caller falls back).
    """
    if len(op.batches) != 1:
        return None
    fl = first_linear(op)
    if fl is None:
        return None
    mname, mod, bias_trainable = fl
    X, y = op.batches[0]
    b = int(X.shape[0])
    params = op._params(op.w)
    with torch.no_grad(), _Capture(mod) as cap:
        try:
            functional_call(op.model, (params, op._consts), (X,))
        except Exception:  # noqa: BLE001 (the ordinary path reports errors)
            return None
    if cap.calls != 1:
        return None
    inp = cap.inputs[0]
    Xf = X.reshape(b, -1)
    if inp.ndim != 2 or inp.shape != Xf.shape or not torch.equal(inp, Xf.to(inp.dtype)):
        return None
    wname = f"{mname}.weight" if mname else "weight"
    bname = f"{mname}.bias" if mname else "bias"
    W = params[wname]
    out_f, d = W.shape
    A = Xf.to(op.dtype)
    Wa = W
    if bias_trainable:
        A = torch.cat([A, A.new_ones((b, 1))], dim=1)
        Wa = torch.cat([W, params[bname].reshape(-1, 1)], dim=1)
    d_aug = A.shape[1]
    U = _row_basis(A.to(torch.float64)).to(op.dtype)
    r = U.shape[1]
    if r >= d_aug:  # no reduction
        return None
    Z = A @ U  # (b, r): the reduced layer's input
    rest = [n for n in op.param_names if n not in (wname, bname)]
    rest_shapes = [tuple(params[n].shape) for n in rest]
    rest_numels = [params[n].numel() for n in rest]
    w_red = torch.cat([(Wa @ U).reshape(-1)] + [params[n].reshape(-1) for n in rest])
    n_red = int(w_red.numel())
    N = op.n_params
    consts = dict(op._consts)
    if mod.bias is not None:
        if bias_trainable:
            consts[bname] = W.new_zeros(out_f)  # absorbed into W~ through the ones column
        # (a frozen bias stays a constant in op._consts)

    def unflat(v):
        parts = v.split([out_f * r] + rest_numels)
        d_ = {wname: parts[0].view(out_f, r)}
        d_.update({n: t.view(s) for n, t, s in zip(rest, parts[1:], rest_shapes)})
        return d_

    def loss_red(v, yy):
        with _Capture(mod, replace=Z):
            outp = functional_call(op.model, (unflat(v), consts), (X,))
        return op.loss_fn(outp, yy)

    dual_t = y.is_floating_point()

    def one(v):
        g = lambda ww, yy: grad(loss_red)(ww, yy)  # noqa: E731
        if dual_t:
            return jvp(g, (w_red, y), (v, torch.zeros_like(y)))[1]
        return jvp(lambda ww: g(ww, y), (w_red,), (v,))[1]

    cs = op.chunk_size or 128
    n_hvp = 0

    def rows(V):
        nonlocal n_hvp
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
            parts = [vmap(one)(V[s:s + cs]) for s in range(0, V.shape[0], cs)]
        n_hvp += V.shape[0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    from ._sharpness import _eigvalsh, minibatch_hessian_eigenvalues  # noqa: PLC0415 (circular)

    if n_red <= dense_max:
        Hr = torch.empty((n_red, n_red), device=op.device, dtype=op.dtype)
        step = 256
        for s in range(0, n_red, step):
            e = min(n_red, s + step)
            E = torch.zeros((e - s, n_red), device=op.device, dtype=op.dtype)
            E[torch.arange(e - s), torch.arange(s, e)] = 1.0
            Hr[s:e] = rows(E)
        Hr = 0.5 * (Hr + Hr.T)
        if not bool(torch.isfinite(Hr).all()):
            raise ValueError("eigenvalues: the minibatch Hessian has non-finite entries (NaN or inf in the "
                             "loss, its gradient or its curvature at these parameters)")
        ev_red = _eigvalsh(Hr.to("cpu", torch.float64).numpy())
    else:
        class _Reduced:
            n_params, device, dtype = n_red, op.device, op.dtype

            def _rows(self, V):
                return rows(V)

        ev_red = minibatch_hessian_eigenvalues(_Reduced(), dense_max=0, rank_tol=rank_tol, seed=seed)
    scale = float(np.max(np.abs(ev_red))) if ev_red.size else 0.0
    if check:
        # a null direction: V_1 = G (I - U U^T) on the first layer (bias column included), 0 elsewhere
        gen = torch.Generator().manual_seed(int(seed) + 1)
        G = torch.randn((out_f, d_aug), generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
        G = G - (G @ U) @ U.T
        v = torch.zeros(N, device=op.device, dtype=op.dtype)
        off = 0
        for nme, k in zip(op.param_names, op._numels):
            if nme == wname:
                v[off:off + k] = G[:, :d].reshape(-1)
            elif nme == bname and bias_trainable:
                v[off:off + k] = G[:, d]
            off += k
        nv = float(torch.linalg.vector_norm(v))
        if nv > 0:
            hv = op._rows(v.reshape(1, -1))
            op.n_hvp -= 1  # counted below with the reduced products
            n_hvp += 1
            if not float(torch.linalg.vector_norm(hv)) <= 1e-8 * max(scale, 1e-300) * nv + 1e-300:
                return None
    ev = np.zeros(N)
    ev[:n_red] = ev_red
    return np.sort(ev), {"rank": r, "n_reduced": n_red, "n_hvp": n_hvp}
