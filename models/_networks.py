"""Networks for the experiments: diagonal linear networks, MLPs, a tiny decoder-only transformer.

All of them are plain ``torch.nn.Module`` s with no dropout and no batch statistics, so a forward
pass is a deterministic function of (parameters, inputs) and torch.func transforms (jvp, vmap,
grad, and forward-over-reverse Hessian-vector products) apply to them. Initial parameters come from a
seeded ``torch.Generator`` (see ``models._init``): the same ``seed`` gives the same network, and the
global torch RNG is left alone.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._init import check_int, factory, fill_normal_, generator, init_linear_, linear

__all__ = [
    "ACTIVATIONS",
    "DiagonalLinearNetwork",
    "MLP",
    "TinyTransformer",
    "num_parameters",
    "paper_mlp",
]


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (trainable or not).

    Example:
        >>> num_parameters(paper_mlp(784, 10))
        12960
    """
    return sum(p.numel() for p in model.parameters())


# --- diagonal linear network ---------------------------------------------------------------------

_DLN_INITS = ("constant", "gaussian", "even")


class DiagonalLinearNetwork(nn.Module):
    """Diagonal linear network f(X) = X β with β = w_1 ⊙ w_2 ⊙ … ⊙ w_depth.

    Each w_l has shape (p,). With the mean-squared loss L = (1/2n) ‖Xβ − y‖² this is the model of
    Even et al. 2023 and arXiv 2412.17613, and the torch twin of ``rdsim.losses.dln(X, y, depth)``.

    Flat layout: the flattened parameter vector is ``concatenate(w_1, …, w_depth)`` (length
    depth·p), exactly the state of ``rdsim.losses.dln``. ``model.parameters()`` yields w_1, …,
    w_depth in that order, so ``torch.nn.utils.parameters_to_vector(model.parameters())`` and
    :meth:`flat_params` agree.

    Args:
        p: input dimension (number of features).
        depth: number of factors D >= 1.
        init_scale: α, the scale of the initialisation.
        init: ``"constant"`` (default): every w_l = α·1, balanced, β_0 = α^D·1 (the default state
            of ``rdsim.losses.dln``, α = 0.1). ``"gaussian"``: entries α·N(0, 1), i.i.d. from the
            seeded generator. ``"even"`` (depth 2 only): w_1 = √2·α·1, w_2 = 0, the u ⊙ v
            initialisation of Even et al. 2023 (β_0 = 0).
        seed: seed of the generator (used by ``init="gaussian"``; accepted and ignored otherwise).
        dtype, device: of the parameters (default: torch's default dtype, CPU).

    Raises:
        ValueError: naming the argument, for a bad p, depth, init_scale, init or seed.

    Example:
        >>> net = DiagonalLinearNetwork(3, depth=2, init_scale=0.5, dtype=torch.float64)
        >>> net.flat_params().tolist()
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
        >>> net(torch.ones(2, 3, dtype=torch.float64)).tolist()
        [0.75, 0.75]

    References:
        Even, Pesme, Gunasekar, Flammarion, "(S)GD over diagonal linear networks: implicit bias,
        large stepsizes and edge of stability", NeurIPS 2023 (arXiv 2302.08982); arXiv 2412.17613.
    """

    def __init__(self, p: int, depth: int = 2, *, init_scale: float = 0.1, init: str = "constant",
                 seed: int = 0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.p = check_int("p", p)
        self.depth = check_int("depth", depth)
        init_scale = float(init_scale)
        if not math.isfinite(init_scale):
            raise ValueError(f"init_scale: expected a finite number, got {init_scale!r}")
        if init not in _DLN_INITS:
            raise ValueError(f"init: expected one of {_DLN_INITS}, got {init!r}")
        if init == "even" and self.depth != 2:
            raise ValueError(f"init: 'even' (u = sqrt(2) alpha, v = 0) needs depth 2, "
                             f"got depth {self.depth}")
        g = generator(seed)  # validates seed
        self.init, self.init_scale = init, init_scale
        kw = factory(dtype, device)
        self.w = nn.ParameterList([nn.Parameter(torch.empty(self.p, **kw))
                                   for _ in range(self.depth)])
        with torch.no_grad():
            for l, w in enumerate(self.w):
                if init == "constant":
                    w.fill_(init_scale)
                elif init == "gaussian":
                    fill_normal_(w, abs(init_scale), g)
                    if init_scale < 0:
                        w.neg_()
                else:  # even
                    w.fill_(math.sqrt(2.0) * init_scale if l == 0 else 0.0)

    def beta(self) -> torch.Tensor:
        """The linear predictor β = w_1 ⊙ … ⊙ w_depth, shape (p,) (differentiable)."""
        # index one by one: slicing a ParameterList re-wraps the tensors that
        # torch.func.functional_call swapped in as new Parameters, cutting them from the graph
        b = self.w[0]
        for i in range(1, len(self.w)):
            b = b * self.w[i]
        return b

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """X (n, p) -> X β, shape (n,)."""
        return X @ self.beta()

    def flat_params(self) -> torch.Tensor:
        """concatenate(w_1, …, w_depth), shape (depth·p,): a detached copy."""
        return torch.cat([w.detach() for w in self.w]).clone()

    @torch.no_grad()
    def set_flat(self, x) -> "DiagonalLinearNetwork":
        """Set the parameters in place from concatenate(w_1, …, w_depth); returns self."""
        ref = self.w[0]
        x = torch.as_tensor(x).to(dtype=ref.dtype, device=ref.device).reshape(-1)
        if x.numel() != self.depth * self.p:
            raise ValueError(f"x: expected {self.depth * self.p} entries (depth * p), "
                             f"got {x.numel()}")
        for l, w in enumerate(self.w):
            w.copy_(x[l * self.p:(l + 1) * self.p])
        return self

    @classmethod
    def from_flat(cls, x, depth: int = 2, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> "DiagonalLinearNetwork":
        """A network whose parameters are the flat vector ``x`` = concatenate(w_1, …, w_depth).

        ``dtype`` defaults to x's dtype when x is a floating tensor or array, else torch's
        default. ``len(x)`` must be a multiple of ``depth``.

        Example:
            >>> net = DiagonalLinearNetwork.from_flat([1.0, 2.0, 3.0, 4.0], depth=2)
            >>> net.beta().tolist()
            [3.0, 8.0]
        """
        depth = check_int("depth", depth)
        t = torch.as_tensor(x)
        if dtype is None:
            dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        t = t.reshape(-1)
        if t.numel() == 0 or t.numel() % depth:
            raise ValueError(f"x: length {t.numel()} is not a positive multiple of depth={depth}")
        net = cls(t.numel() // depth, depth, dtype=dtype, device=device)
        return net.set_flat(t)

    def extra_repr(self) -> str:
        return f"p={self.p}, depth={self.depth}, init={self.init!r}, init_scale={self.init_scale}"


# --- MLP -----------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "softplus": F.softplus,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "identity": lambda x: x,
}


class MLP(nn.Module):
    """Fully connected network in -> width -> … -> width -> out with ``depth`` linear layers.

    f(x) = W_depth σ(… σ(W_2 σ(W_1 x + b_1) + b_2) …) + b_depth; the activation σ sits between
    linear layers, never after the last one (the outputs are logits or regression values).
    Inputs of shape (n, *) are flattened to (n, in_dim), so (n, 28, 28) images can be fed directly.

    Weights (and biases) follow torch's default ``nn.Linear`` distribution
    U(−1/√fan_in, 1/√fan_in), drawn from a generator seeded with ``seed``.

    Parameter count: in·w + (depth − 2)·w² + w·out weights (depth >= 2; in·out for depth 1),
    plus (depth − 1)·w + out biases when ``bias=True``.

    Args:
        in_dim, out_dim: input and output sizes.
        width: hidden width (ignored when depth = 1).
        depth: number of linear layers (>= 1); depth 3 means in -> width -> width -> out.
        bias: whether the linear layers have biases.
        activation: a name in :data:`ACTIVATIONS` ("relu", "gelu", "tanh", "sigmoid", "silu",
            "softplus", "elu", "leaky_relu", "identity").
        seed: seed of the initialisation.
        dtype, device: of the parameters.

    Raises:
        ValueError: naming the argument, for bad sizes, activation or seed.

    Example:
        >>> net = MLP(10, 1, width=32, depth=3, bias=True, seed=0)
        >>> num_parameters(net)  # 10*32 + 32*32 + 32*1 weights + 32 + 32 + 1 biases
        1441
    """

    def __init__(self, in_dim: int, out_dim: int, width: int, depth: int, *, bias: bool = True,
                 activation: str = "relu", seed: int = 0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim)
        self.out_dim = check_int("out_dim", out_dim)
        self.width = check_int("width", width)
        self.depth = check_int("depth", depth)
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, "
                             f"got {activation!r}")
        self.activation, self.bias = activation, bool(bias)
        self._act = ACTIVATIONS[activation]
        g = generator(seed)
        sizes = [self.in_dim] + [self.width] * (self.depth - 1) + [self.out_dim]
        kw = factory(dtype, device)
        self.layers = nn.ModuleList(linear(a, b, self.bias, kw)
                                    for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            init_linear_(layer, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, in_dim) or (n, *) with prod(*) = in_dim -> (n, out_dim)."""
        if x.dim() > 2:
            x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            if i:
                x = self._act(x)
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, width={self.width}, "
                f"depth={self.depth}, bias={self.bias}, activation={self.activation!r}")


def paper_mlp(in_dim: int = 784, out_dim: int = 10, *, seed: int = 0,
              dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> MLP:
    """The MLP of arXiv 2604.19740: three bias-free linear layers in -> 16 -> 16 -> out, ReLU.

    Parameter count in·16 + 16·16 + 16·out: 12,960 for MNIST (784 -> 10), 1,440 for the 8x8
    digits (64 -> 10), 1,056 for MNIST-1D (40 -> 10).

    Example:
        >>> [num_parameters(paper_mlp(d, 10)) for d in (784, 64, 40)]
        [12960, 1440, 1056]
    """
    return MLP(in_dim, out_dim, width=16, depth=3, bias=False, activation="relu", seed=seed,
               dtype=dtype, device=device)


# --- tiny transformer ----------------------------------------------------------------------------

class _CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written out: softmax(QKᵀ/√d_head + mask) V.

    No fused ``scaled_dot_product_attention``: every operation here has a double derivative, so
    forward-over-reverse Hessian-vector products work.
    """

    def __init__(self, d_model: int, n_heads: int, kw: dict):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = linear(d_model, 3 * d_model, True, kw)
        self.out = linear(d_model, d_model, True, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        # (B, T, D) -> (B, H, T, d_head)
        q, k, v = (t.reshape(B, T, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.out(y)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (GELU)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, kw: dict):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, **kw)
        self.attn = _CausalSelfAttention(d_model, n_heads, kw)
        self.ln2 = nn.LayerNorm(d_model, **kw)
        self.fc1 = linear(d_model, d_ff, True, kw)
        self.fc2 = linear(d_ff, d_model, True, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A small decoder-only (causal) transformer language model, without dropout.

    tokens (B, T) -> token embedding + learned positional embedding -> n_layers pre-LN blocks
    (causal multi-head self-attention, then a GELU MLP of width d_ff) -> final LayerNorm ->
    unembedding (no bias) -> logits (B, T, vocab). Attention is written out explicitly,
    softmax(QKᵀ/√d_head with −∞ above the diagonal) V, rather than torch's fused
    ``scaled_dot_product_attention``, so double derivatives work: Hessian-vector products by
    ``torch.func.jvp`` over ``torch.func.grad`` (forward-over-reverse) or by double backward.

    Initialisation (seeded), torch's defaults: embeddings N(0, 1) (as ``nn.Embedding``), linear layers torch's default
    U(−1/√fan_in, 1/√fan_in) (biases likewise), LayerNorm weight 1 and bias 0.

    Parameter count: vocab·d + max_len·d (embeddings) + n_layers·(4d² + 4d (attention)
    + 2·d·d_ff + d_ff + d (MLP) + 4d (two LayerNorms)) + 2d (final LayerNorm) + d·vocab.

    Args:
        vocab: vocabulary size.
        d_model: embedding width d (divisible by n_heads).
        n_heads: attention heads.
        n_layers: transformer blocks.
        max_len: longest sequence accepted (size of the positional embedding).
        d_ff: MLP hidden width (default 4·d_model).
        seed: seed of the initialisation.
        dtype, device: of the parameters.

    Raises:
        ValueError: naming the argument, for bad sizes or seed.

    Example:
        >>> net = TinyTransformer(vocab=11, d_model=8, n_heads=2, n_layers=1, max_len=4)
        >>> net(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 11])
        >>> num_parameters(net)  # 88 + 32 + (256 + 32 + 512 + 32 + 8 + 32) + 16 + 88
        1096
    """

    def __init__(self, vocab: int, d_model: int = 32, n_heads: int = 2, n_layers: int = 1,
                 max_len: int = 16, *, d_ff: int | None = None, seed: int = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.vocab = check_int("vocab", vocab)
        self.d_model = check_int("d_model", d_model)
        self.n_heads = check_int("n_heads", n_heads)
        self.n_layers = check_int("n_layers", n_layers)
        self.max_len = check_int("max_len", max_len)
        self.d_ff = 4 * self.d_model if d_ff is None else check_int("d_ff", d_ff)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}")
        g = generator(seed)
        kw = factory(dtype, device)
        self.tok_emb = nn.Parameter(torch.empty(self.vocab, self.d_model, **kw))
        self.pos_emb = nn.Parameter(torch.empty(self.max_len, self.d_model, **kw))
        self.blocks = nn.ModuleList(_Block(self.d_model, self.n_heads, self.d_ff, kw)
                                    for _ in range(self.n_layers))
        self.ln_f = nn.LayerNorm(self.d_model, **kw)
        self.unembed = linear(self.d_model, self.vocab, False, kw)
        fill_normal_(self.tok_emb, 1.0, g)
        fill_normal_(self.pos_emb, 1.0, g)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear_(m, g)
            elif isinstance(m, nn.LayerNorm):
                with torch.no_grad():
                    m.weight.fill_(1.0)
                    m.bias.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) integer, T <= max_len -> logits (B, T, vocab)."""
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dim() != 2:
            raise ValueError(f"tokens: expected an integer tensor of shape (batch, seq), got "
                             f"dtype {tokens.dtype} and shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"tokens: sequence length {T} exceeds max_len={self.max_len}")
        x = self.tok_emb[tokens] + self.pos_emb[:T]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab}, d_model={self.d_model}, n_heads={self.n_heads}, "
                f"n_layers={self.n_layers}, max_len={self.max_len}, d_ff={self.d_ff}")
