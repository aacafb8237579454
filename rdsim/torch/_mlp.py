"""Batched Hessian-vector products for fully connected chains, written out (private).

The fast path of :meth:`rdsim.torch._functional.FlatModel.grad_hvp` for the networks most edge of
stability studies use: a chain of ``Linear`` layers (with or without bias) and elementwise
activations, fed a (flattened) batch, ending in mean cross-entropy or mean squared error. For such
a chain the exact products H_B V of k tangent rows are the R-operator (Pearlmutter 1994) with the
k rows folded into GEMMs: tangent activations live in a (k, B, n) layout, so every product of a
batch quantity with a tangent quantity is one (batched) matrix product, and nothing is dispatched
per row. On the benchmark MLP (26k parameters, batch 128, 2 CPU threads) the push is ~2x faster than
``vmap`` over a reverse-over-reverse pullback at k = 1 and ~1.2-1.4x at k = 16
(``benchmarks/bench_optim.py``, part b2).

Recognition is by structure, never by class name: :func:`detect_chain` traces the flat loss once
with ``make_fx`` and accepts only a graph made of the parameter split, 2-D ``addmm``/``mm`` layers,
a whitelisted activation between consecutive layers, an optional flattening of the input, and the
loss, each intermediate used exactly once and every parameter used exactly once. Anything else
(convolutions, normalisation, residual connections, tied weights, constants, a branch on a tensor
value, label smoothing, class weights) gives no chain, and the generic ``torch.func`` path is used.
An accepted chain is then checked numerically against that generic path at the tracing point
(gradient, products and loss to ~1e3 eps of their size) before it is used.

Math (row-wise, h_0 = x, a_l = W_l h_{l-1} + b_l, h_l = s_l(a_l), z = a_L, loss L(z, y)):
forward tangent a'_l = V_l h_{l-1} + W_l h'_{l-1} + v_l, h'_l = s'(a_l) a'_l; output error
e = dL/dz and its tangent e' = (d^2L/dz^2) z'; backward d_L = e, d'_L = e',
d_{l-1} = s'(a_{l-1}) (W_l^T d_l), d'_{l-1} = s'(a_{l-1}) (W_l^T d'_l + V_l^T d_l)
+ s''(a_{l-1}) a'_{l-1} (W_l^T d_l); gradient blocks d_l^T h_{l-1} and d_l; product blocks
(H V)_{W_l} = d'_l^T h_{l-1} + d_l^T h'_{l-1}, (H V)_{b_l} = sum over the batch of d'_l.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch

aten = torch.ops.aten

#: activations the chain accepts, by aten op (leaky_relu's slope and gelu's form are checked)
_ACTIVATIONS = {aten.tanh.default: "tanh", aten.relu.default: "relu", aten.sigmoid.default: "sigmoid",
                aten.silu.default: "silu", aten.gelu.default: "gelu", aten.leaky_relu.default: "leaky_relu"}
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


@dataclasses.dataclass(frozen=True)
class Chain:
    """A recognised chain: per layer (weight index, bias index or None) into the flat layout's
    parameter list, the activation after each hidden layer ((name, slope) or None), the loss
    ("cross_entropy" with its ignore_index; "mse", the mean over all entries of the squared error,
    as ``F.mse_loss`` or ``((out - t) ** 2).mean()``, possibly of ``out.squeeze(-1)``; "sse_rows",
    ``((out - t) ** 2).sum(-1).mean()``), and whether the input is flattened."""
    layers: tuple
    acts: tuple
    loss: str
    ignore_index: int
    flatten: bool
    scale: float  # a constant factor on the loss (0.5 * F.mse_loss(...))
    offsets: tuple  # (start, stop) of each parameter in the flat vector
    shapes: tuple
    ws: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # scratch buffers


_SQUEEZES = (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)


def _is_output(node, last_lin, h, kind) -> bool:
    """Whether ``node`` is the network's output (the last linear layer, or a view of it)."""
    return (node is last_lin and h is last_lin) or kind.get(node) == ("zview",)


def _same_shape(a, b) -> bool:
    """Whether two traced nodes hold tensors of one shape (no broadcasting)."""
    return tuple(a.meta["val"].shape) == tuple(b.meta["val"].shape)


def _fail(why):
    raise _NoChain(why)


class _NoChain(Exception):
    pass


def _parse(graph, numels, shapes, batch):
    """The Chain of a traced loss graph, or _NoChain with the reason."""
    kind = {}  # node -> descriptor
    layers, acts = [], []
    h = None  # the node holding the current layer input
    last_lin = None  # the node holding the latest linear output
    pending_act = None
    loss_node = None
    loss, ignore_index, flatten, scale = None, -100, False, 1.0
    used = [0] * len(numels)
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(phs) != 3:
        _fail("unexpected arguments")
    kind[phs[0]], kind[phs[1]], kind[phs[2]] = ("x",), ("input",), ("target",)
    h = phs[1]
    for n in graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out = n.args[0]
            if out is not loss_node or loss_node is None:
                _fail("the output is not the loss")
            continue
        if n.op != "call_function":
            _fail(f"a {n.op} node ({n.target})")
        f, args = n.target, n.args
        if n.kwargs and f not in (aten.gelu.default,):
            _fail(f"keyword arguments to {f}")
        if f is aten.split_with_sizes.default and kind.get(args[0]) == ("x",):
            if list(args[1]) != list(numels) or len(args) > 2:
                _fail("the parameter split")
            kind[n] = ("split",)
        elif f is operator.getitem and kind.get(args[0]) == ("split",):
            kind[n] = ("chunk", args[1])
        elif f is operator.getitem and kind.get(args[0], ("",))[0] == "nll":
            if args[1] == 0:
                kind[n] = ("loss",)
                loss_node = n
            elif n.users:
                _fail("the total weight of nll_loss is used")
        elif f in _VIEWS and kind.get(args[0], ("",))[0] == "chunk":
            i = kind[args[0]][1]
            if tuple(args[1]) != tuple(shapes[i]):
                _fail("a parameter view")
            kind[n] = ("param", i)
        elif f in _VIEWS and args[0] is h and kind.get(h) == ("input",):
            if len(args[1]) != 2 or args[1][0] not in (batch, -1):
                _fail("an input reshape that is not a flatten")
            kind[n] = ("input",)
            h, flatten = n, True
        elif f is aten.t.default and kind.get(args[0], ("",))[0] == "param" and len(shapes[kind[args[0]][1]]) == 2:
            kind[n] = ("wt", kind[args[0]][1])
        elif f in (aten.addmm.default, aten.mm.default):
            if f is aten.addmm.default:
                if len(args) != 3 or kind.get(args[0], ("",))[0] != "param":
                    _fail("addmm with a non-parameter bias")
                b, x_in, wt = args
                bi = kind[b][1]
                if len(shapes[bi]) != 1:
                    _fail("a bias that is not a vector")
            else:
                x_in, wt = args
                bi = None
            if kind.get(wt, ("",))[0] != "wt" or x_in is not h:
                _fail("a matrix product that is not the next layer")
            wi = kind[wt][1]
            if bi is not None and shapes[bi][0] != shapes[wi][0]:
                _fail("bias size")
            if layers:
                acts.append(pending_act)
            for i in (wi, bi):
                if i is not None:
                    used[i] += 1
            layers.append((wi, bi))
            kind[n] = ("lin",)
            last_lin, h, pending_act = n, n, None
        elif f in _ACTIVATIONS and args[0] is last_lin and h is last_lin:
            name = _ACTIVATIONS[f]
            param = None
            if name == "leaky_relu":
                param = float(args[1]) if len(args) > 1 else 0.01
            if name == "gelu" and (n.kwargs.get("approximate", "none") != "none" or len(args) > 1):
                _fail("gelu with the tanh approximation")
            pending_act = (name, param)
            kind[n] = ("act",)
            h = n
        elif f in (aten.mul.Tensor, aten.div.Tensor) and args[0] is loss_node and loss_node is not None \
                and isinstance(args[1], (int, float)) and not isinstance(args[1], bool) and args[1] != 0:
            scale = scale * args[1] if f is aten.mul.Tensor else scale / args[1]
            kind[n] = ("loss",)
            loss_node = n
        elif f is aten._log_softmax.default and args[0] is last_lin and h is last_lin:
            if args[1] not in (1, -1):
                _fail("log_softmax over a non-class dimension")
            kind[n] = ("logp",)
        elif f is aten.nll_loss_forward.default and kind.get(args[0]) == ("logp",) and kind.get(args[1]) == ("target",):
            if args[2] is not None or args[3] != 1:
                _fail("class weights or a reduction other than the mean")
            loss, ignore_index = "cross_entropy", int(args[4])
            kind[n] = ("nll",)
        elif (f in _VIEWS or f in _SQUEEZES) and args[0] is last_lin and h is last_lin:
            kind[n] = ("zview",)  # e.g. out.squeeze(-1) before a squared error
        elif f is aten.sub.Tensor and _is_output(args[0], last_lin, h, kind) and kind.get(args[1]) == ("target",):
            if not _same_shape(args[0], args[1]):
                _fail("a residual with broadcast targets")
            kind[n] = ("resid",)
        elif (f is aten.pow.Tensor_Scalar and kind.get(args[0]) == ("resid",) and args[1] == 2) or \
                (f is aten.mul.Tensor and kind.get(args[0]) == ("resid",) and args[1] is args[0]):
            kind[n] = ("sq",)
        elif f is aten.sum.dim_IntList and kind.get(args[0]) == ("sq",) and args[0].meta["val"].dim() == 2 \
                and list(args[1]) in ([-1], [1]) and (len(args) < 3 or not args[2]):
            kind[n] = ("sqsum",)
        elif f is aten.mean.default and kind.get(args[0], ("",))[0] in ("sq", "sqsum") and loss is None:
            loss = "mse" if kind[args[0]] == ("sq",) else "sse_rows"
            kind[n] = ("loss",)
            loss_node = n
        elif f is aten.mse_loss.default and _is_output(args[0], last_lin, h, kind) and kind.get(args[1]) == ("target",):
            if len(args) > 2 and args[2] != 1:
                _fail("mse_loss with a reduction other than the mean")
            if not _same_shape(args[0], args[1]):
                _fail("mse_loss with broadcast targets")
            loss = "mse"
            kind[n] = ("loss",)
            loss_node = n
        else:
            _fail(f"operation {f}")
    for n, d in kind.items():
        # every intermediate has exactly one user (no residual branches, no reuse)
        if d[0] in ("lin", "act", "logp", "wt", "loss", "nll", "param", "chunk", "zview", "resid", "sq", "sqsum") \
                and len(n.users) != 1 \
                and not (d[0] == "nll" and len(n.users) == 2) and not (d[0] == "loss" and n is loss_node):
            _fail("an intermediate with several uses")
    if not layers or loss is None or any(u != 1 for u in used):
        _fail("not every parameter enters exactly one layer")
    offs, o = [], 0
    for m in numels:
        offs.append((o, o + m))
        o += m
    return Chain(tuple(layers), tuple(acts), loss, ignore_index, flatten, float(scale), tuple(offs),
                 tuple(tuple(s) for s in shapes))


def _act_derivs(act, a, h):
    """(s'(a), s''(a) or None) of an activation from its input a and output h."""
    name, param = act
    if name == "tanh":
        d1 = 1.0 - h.square()
        return d1, -2.0 * h * d1
    if name == "sigmoid":
        d1 = h * (1.0 - h)
        return d1, d1 * (1.0 - 2.0 * h)
    if name == "relu":
        return (h > 0).to(h.dtype), None
    if name == "leaky_relu":
        return torch.where(a > 0, torch.ones_like(a), torch.full_like(a, param)), None
    if name == "silu":
        s = torch.sigmoid(a)
        return s * (1.0 + a * (1.0 - s)), s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s))
    if name == "gelu":
        phi = torch.exp(-0.5 * a.square()) / math.sqrt(2.0 * math.pi)
        cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
        return cdf + a * phi, phi * (2.0 - a.square())
    raise AssertionError(name)


def _apply_act(act, a):
    name, param = act
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(a, param)
    return getattr(torch, name)(a) if name in ("tanh", "sigmoid", "relu") else getattr(torch.nn.functional, name)(a)


def _workspace(chain: Chain, B: int, k: int, like: torch.Tensor) -> dict:
    """The chain's scratch buffers for (B, k, dtype, device), allocated once and reused: fresh
    megabyte-sized temporaries on every call cost page faults (measured: ~2,400 minor faults per
    call at k = 16 on the benchmark MLP, a third of the push's time on the 2-core VM)."""
    key = (B, k, like.dtype, like.device)
    ws = chain.ws
    if ws.get("key") != key:
        ws.clear()
        ws["key"] = key
        kw = {"dtype": like.dtype, "device": like.device}
        sh = [chain.shapes[w] for w, _ in chain.layers]
        ws["adot"] = [torch.empty(k, B, o, **kw) for o, _ in sh]
        ws["hdot"] = [torch.empty(k, B, o, **kw) for o, _ in sh[:-1]]
        ws["bd"] = [torch.empty(k, B, i, **kw) for _, i in sh]
        ws["ddot"] = torch.empty(k, B, sh[-1][0], **kw)
        ws["hvw"] = [torch.empty(k, o, i, **kw) for o, i in sh]
    return ws


def chain_grad_hvp(chain: Chain, x, V, xb, yb, per_row: bool = False, sgd_lr: float | None = None):
    """(g, H V, loss) of the chain's mean loss at the flat parameters x, H applied to the rows of V (k, d).

    With a float ``sgd_lr``, the second result is V - sgd_lr H V instead (the tangent of a plain
    SGD step), written block by block as each layer's products are formed: bitwise
    ``torch.add(V, H V, alpha=-sgd_lr)``, without a pass over a separate H V (measured ~10% of the
    push at k = 16 on the benchmark MLP).

    With ``per_row=True``, xb and yb carry one batch per row of V ((k, B, ...) and (k, B, ...)),
    row r of the result is row r of V times the Hessian on batch r (lockstep SLQ with a minibatch
    per run), and g and the loss are not formed (None). The primal activations then have the
    tangents' (k, B, n) layout, and the same code runs with batched GEMMs in their place.

    No autograd: call under ``torch.no_grad()``. g and H V are fresh tensors; the intermediates
    live in the chain's workspace (:func:`_workspace`), so calls on one chain must not overlap.
    Tangent quantities are (k, B, n): every product of a batch quantity with the tangent rows'
    weight blocks is one batched GEMM over k with unit-stride operands, and the products with a
    layer's own weights are single GEMMs over the k B rows, so that no operand is ever transposed
    into a copy (measured ~17% faster per hidden layer than a (B, k, n) layout at k = 16).
    """
    k = V.shape[0]
    B = xb.shape[1] if per_row else xb.shape[0]
    lead = (k, B) if per_row else (B,)  # the primal quantities' leading dimensions
    ws = _workspace(chain, B, k, x)
    W = [x[slice(*chain.offsets[w])].view(chain.shapes[w]) for w, _ in chain.layers]
    bias = [None if b is None else x[slice(*chain.offsets[b])] for _, b in chain.layers]
    VW = [V[:, slice(*chain.offsets[w])].view(k, *chain.shapes[w]) for w, _ in chain.layers]
    Vb = [None if b is None else V[:, slice(*chain.offsets[b])] for _, b in chain.layers]
    n_l = len(W)
    hs, pre = [xb.reshape(*lead, -1) if chain.flatten else xb], []
    for i in range(n_l):
        h2 = hs[-1].reshape(-1, W[i].shape[1])
        a = (h2 @ W[i].t() if bias[i] is None else torch.addmm(bias[i], h2, W[i].t())).view(*lead, W[i].shape[0])
        pre.append(a)
        act = chain.acts[i] if i < n_l - 1 else None
        hs.append(a if act is None else _apply_act(act, a))
    z = hs[-1]
    derivs = [None if i == n_l - 1 or chain.acts[i] is None else _act_derivs(chain.acts[i], pre[i], hs[i + 1])
              for i in range(n_l)]
    # forward tangents: adot[i] of pre[i], hdot[i] of hs[i]
    hdot, adot = [None], ws["adot"]
    for i in range(n_l):
        out_, in_ = W[i].shape
        t = adot[i]
        torch.matmul(hs[i], VW[i].transpose(1, 2), out=t)
        if Vb[i] is not None:
            t += Vb[i].unsqueeze(1)
        if hdot[i] is not None:
            t.view(k * B, out_).addmm_(hdot[i].view(k * B, in_), W[i].t())
        if i < n_l - 1:
            hdot.append(t if derivs[i] is None else torch.mul(t, derivs[i][0], out=ws["hdot"][i]))
    zdot = adot[-1]
    if chain.loss == "cross_entropy":
        logp = torch.log_softmax(z, -1)
        valid = yb != chain.ignore_index
        cls = torch.where(valid, yb, torch.zeros_like(yb))[..., None]
        w = valid.to(z.dtype)
        n_valid = w.sum(-1, keepdim=True)  # per batch
        loss = None if per_row else -(logp.gather(-1, cls)[..., 0] * w).sum() / n_valid[0]
        p = logp.exp()
        scale = (w / n_valid)[..., None]
        delta = p.scatter_add(-1, cls, torch.full(cls.shape, -1.0, dtype=p.dtype, device=p.device))
        delta *= scale
        ddot = torch.mul(zdot, p, out=ws["ddot"])
        ddot.addcmul_(p, ddot.sum(2, keepdim=True), value=-1.0).mul_(scale)
    else:  # mean squared error over all entries ("mse") or summed over outputs, mean over rows
        r = (z.reshape(yb.shape) - yb).reshape(z.shape)
        c = 2.0 / (B if chain.loss == "sse_rows" else r[0].numel() if per_row else r.numel())
        loss = None if per_row else r.square().sum() * (0.5 * c)
        delta = c * r
        ddot = torch.mul(zdot, c, out=ws["ddot"])
    if chain.scale != 1.0:
        loss = None if loss is None else loss * chain.scale
        delta = delta * chain.scale
        ddot.mul_(chain.scale)
    g, HV = None if per_row else torch.empty_like(x), torch.empty_like(V)
    dT = delta.transpose(-1, -2)  # (out, B) or (k, out, B)
    for i in reversed(range(n_l)):
        out_, in_ = W[i].shape
        wi, bi = chain.layers[i]
        w0, w1 = chain.offsets[wi]
        if g is not None:
            torch.mm(dT, hs[i], out=g[w0:w1].view(out_, in_))
        HVw = ws["hvw"][i]  # contiguous: into HV's strided block, baddbmm_ would loop over the k rows
        torch.matmul(ddot.transpose(1, 2), hs[i], out=HVw)
        if hdot[i] is not None:
            HVw.baddbmm_(dT.expand(k, out_, B), hdot[i])
        _put(HV, V, w0, w1, HVw.view(k, -1), sgd_lr)
        if bi is not None:
            b0, b1 = chain.offsets[bi]
            if g is not None:
                g[b0:b1] = delta.sum(0)
            _put(HV, V, b0, b1, ddot.sum(1), sgd_lr)
        if i:
            back = delta @ W[i]
            bd = ws["bd"][i]
            torch.matmul(delta, VW[i], out=bd)
            bd.view(k * B, in_).addmm_(ddot.view(k * B, out_), W[i])
            d = derivs[i - 1]
            if d is None:
                ddot, delta = bd, back
            else:
                bd *= d[0]
                if d[1] is not None:
                    bd.addcmul_(back * d[1], adot[i - 1])
                ddot, delta = bd, back * d[0]
            dT = delta.transpose(-1, -2)
    return g, HV, loss


def _put(out, V, a, b, block, sgd_lr):
    """out[:, a:b] = block, or V[:, a:b] - sgd_lr block (see :func:`chain_grad_hvp`)."""
    if sgd_lr is None:
        out[:, a:b].copy_(block)
    else:
        torch.add(V[:, a:b], block, alpha=-sgd_lr, out=out[:, a:b])


def check_chain(chain: Chain, x, xb, yb, reference) -> str:
    """"" when the written-out (g, HV, loss) agree with ``reference(x, V, xb, yb)`` (the generic
    path) at x for two random rows V, to 1e3 eps of their size; else the reason they do not."""
    if chain.loss == "cross_entropy" and (yb.is_floating_point() or yb.dim() != 1):
        return "cross-entropy with probability targets"
    if chain.loss != "cross_entropy" and not yb.is_floating_point():
        return "a squared error with integer targets"
    gen = torch.Generator(device="cpu").manual_seed(0)
    V = torch.randn(2, x.numel(), generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    try:
        with torch.no_grad():
            mine = chain_grad_hvp(chain, x.detach(), V, xb, yb)
        ref = reference(x.detach(), V, xb, yb)
    except Exception as err:  # noqa: BLE001 - any failure means: use the generic path
        return f"check failed: {type(err).__name__}: {err}"
    tol = 1e3 * torch.finfo(x.dtype).eps
    for a, b in zip(mine, ref):
        scale = float(b.abs().max()) if b.numel() else 0.0
        if not (torch.isfinite(a).all() and float((a - b).abs().max()) <= tol * max(scale, 1e-30)):
            return "the written-out products disagree with torch.func"
    return ""


def detect_chain(loss, numels, shapes, x, xb, yb, reference):
    """(Chain or None, reason): the chain of ``loss(x, xb, yb)`` (x flat, split as ``numels`` and
    viewed as ``shapes``) if it is one and :func:`check_chain` passes at this point."""
    from torch.fx.experimental.proxy_tensor import make_fx
    if x.dtype not in (torch.float32, torch.float64):
        return None, f"parameters in {x.dtype} (the check against torch.func needs float32 or float64)"
    if xb.dim() < 2:
        return None, "inputs are not a batch of vectors"
    if not yb.is_floating_point() and yb.dim() != 1:
        return None, "class targets are not a vector"
    try:
        gm = make_fx(lambda a, b, c: loss(a, b, c))(x.detach(), xb, yb)
        chain = _parse(gm.graph, numels, shapes, xb.shape[0])
    except _NoChain as why:
        return None, str(why)
    except Exception as err:  # noqa: BLE001 - a model that cannot be traced is not a chain
        return None, f"tracing failed: {type(err).__name__}"
    why = check_chain(chain, x, xb, yb, reference)
    return (None, why) if why else (chain, "chain")
