"""Optimizer specs shared by both backends (numba toy losses, torch networks).

A spec is a frozen, validated set of hyperparameters; the update math lives with each backend
(:func:`rdsim.optimizer_map` for toy losses, :class:`rdsim.torch.OptimizerMap` for networks) and
follows ``torch.optim`` exactly, with the step counter starting at 1 (MATH.md §1):

* GD / SGD:     x' = x - lr g
* momentum:     m' = beta m + g;  x' = x - lr m'                      (torch.optim.SGD, momentum)
* Adam / AdamW: g = grad (+ weight_decay x unless decoupled); m' = b1 m + (1-b1) g;
  v' = b2 v + (1-b2) g^2;  x' = x (1 - lr wd [decoupled]) - lr m'/(1-b1^t) / (sqrt(v'/(1-b2^t)) + eps)

The minibatch B_t is the noise of the random map: ``sampling="iid"`` draws an independent
uniformly random subset of size ``batch_size`` each step (the paper's model), ``"epoch"``
reshuffles the data every epoch and walks through it. :func:`minibatch_sampler` produces the
index sequence from a seeded generator; both backends call it, so the same seed and spec give
the same minibatches on both.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from ._validate import check_bool, check_choice, check_int, check_nonneg_float, check_positive_float, check_unit_interval

__all__ = ["OptimizerSpec", "gd", "sgd", "momentum", "adam", "minibatch_sampler", "noise_sampler"]

SAMPLINGS = ("iid", "epoch")
KINDS = ("gd", "sgd", "momentum", "adam")


def _positive(value, name):
    return check_positive_float(name, value)


def _unit_interval(value, name):
    return check_unit_interval(name, value)


def _nonneg(value, name):
    return check_nonneg_float(name, value)


def _batch(value):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"batch_size: expected a positive integer or None (full batch), got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"batch_size: expected a positive integer or None (full batch), got {value}")
    return int(value)


def _sampling(value):
    return check_choice("sampling", value, SAMPLINGS)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """Hyperparameters of one optimizer (frozen). Build it with :func:`gd`, :func:`sgd`,
    :func:`momentum` or :func:`adam`, which validate their arguments.

    Attributes:
        kind: "gd", "sgd", "momentum" or "adam".
        lr: learning rate eta > 0.
        batch_size: minibatch size b, or None for the full batch.
        sampling: "iid" or "epoch".
        beta: heavy-ball momentum (momentum only).
        beta1, beta2, eps, weight_decay, decoupled: Adam / AdamW.
    """

    kind: str
    lr: float
    batch_size: int | None = None
    sampling: str = "iid"
    beta: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def __post_init__(self):
        # the factories validate already; this catches direct construction and dataclasses.replace
        check_choice("kind", self.kind, KINDS)
        for name, value in (("lr", _positive(self.lr, "lr")), ("batch_size", _batch(self.batch_size)),
                            ("sampling", _sampling(self.sampling)), ("beta", _unit_interval(self.beta, "beta")),
                            ("beta1", _unit_interval(self.beta1, "beta1")),
                            ("beta2", _unit_interval(self.beta2, "beta2")), ("eps", _nonneg(self.eps, "eps")),
                            ("weight_decay", _nonneg(self.weight_decay, "weight_decay")),
                            ("decoupled", check_bool("decoupled", self.decoupled))):
            object.__setattr__(self, name, value)
        if self.kind == "sgd" and self.batch_size is None:
            raise ValueError("batch_size: sgd needs a batch size; use gd(lr) for the full batch")
        if self.kind == "gd" and self.batch_size is not None:
            raise ValueError("batch_size: gd is full batch; use sgd(lr, batch_size) for minibatches")

    @property
    def n_buffers(self) -> int:
        """Number of state blocks of size d besides x: 0 (GD/SGD), 1 (m) or 2 (m, v)."""
        return {"gd": 0, "sgd": 0, "momentum": 1, "adam": 2}[self.kind]

    @property
    def stochastic(self) -> bool:
        return self.batch_size is not None

    def check_data_size(self, n: int) -> None:
        """Raise ValueError if the batch size exceeds the number of samples n."""
        n = check_int("n", n, 0)
        if self.batch_size is not None and self.batch_size > n:
            raise ValueError(f"batch_size: {self.batch_size} exceeds the number of samples ({n})")

    def label(self) -> str:
        parts = [f"lr={self.lr:g}"]
        if self.batch_size is not None:
            parts.append(f"b={self.batch_size}")
            if self.sampling != "iid":
                parts.append(f"sampling={self.sampling}")
        if self.kind == "momentum":
            parts.append(f"beta={self.beta:g}")
        if self.kind == "adam":
            parts.append(f"betas=({self.beta1:g}, {self.beta2:g})")
            if self.weight_decay:
                parts.append(f"wd={self.weight_decay:g}{' (AdamW)' if self.decoupled else ''}")
        return f"{self.kind}({', '.join(parts)})"


def gd(lr: float) -> OptimizerSpec:
    """Full-batch gradient descent x' = x - lr grad L(x) (a deterministic map).

    Raises:
        TypeError: ``lr`` not a real number (a string such as "0.1" is refused).
        ValueError: ``lr`` not positive and finite.
    """
    return OptimizerSpec("gd", _positive(lr, "lr"))


def sgd(lr: float, batch_size: int, sampling: str = "iid") -> OptimizerSpec:
    """Minibatch SGD x' = x - lr grad L_B(x); the minibatch B_t is the noise.

    Args:
        lr: learning rate (> 0, finite).
        batch_size: minibatch size (an integer >= 1, at most the number of samples).
        sampling: "iid" (an independent uniform subset of size b each step, the model of
            arXiv 2604.19740) or "epoch" (reshuffled epochs; a last partial batch is dropped).

    Raises:
        TypeError: ``lr`` not a real number, ``batch_size`` not an integer, ``sampling`` not a string.
        ValueError: values out of range (named in the message); ``batch_size=None`` (use :func:`gd`).
    """
    if batch_size is None:
        raise ValueError("batch_size: sgd needs a batch size; use gd(lr) for the full batch")
    return OptimizerSpec("sgd", _positive(lr, "lr"), _batch(batch_size), _sampling(sampling))


def momentum(lr: float, beta: float = 0.9, batch_size: int | None = None, sampling: str = "iid") -> OptimizerSpec:
    """Heavy-ball momentum (torch.optim.SGD with momentum, no dampening): m' = beta m + g, x' = x - lr m'.

    Args:
        lr: learning rate (> 0, finite).
        beta: momentum coefficient in [0, 1).
        batch_size: minibatch size (integer >= 1) or None for the full batch.
        sampling: "iid" or "epoch" (see :func:`sgd`).

    Raises:
        TypeError / ValueError: as :func:`sgd`; ``beta`` outside [0, 1).
    """
    return OptimizerSpec("momentum", _positive(lr, "lr"), _batch(batch_size), _sampling(sampling),
                         beta=_unit_interval(beta, "beta"))


def adam(lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
         decoupled: bool = False, batch_size: int | None = None, sampling: str = "iid") -> OptimizerSpec:
    """Adam (decoupled=False, L2 decay added to the gradient) or AdamW (decoupled=True), torch conventions.

    Args:
        lr: learning rate (> 0, finite).
        beta1, beta2: moment coefficients in [0, 1).
        eps: the denominator's regulariser (>= 0, finite). ``eps=0`` is accepted, as by
            ``torch.optim.Adam``; then a coordinate whose second moment v is exactly 0 (a zero
            gradient since the start, e.g. at the first step from a stationary coordinate) gives
            a 0/0 = nan (or inf) step, and ``lyapunov_spectrum`` reports the run as "diverged".
        weight_decay: decay coefficient (>= 0, finite).
        decoupled: True for AdamW (a bool; strings such as "yes" are refused).
        batch_size: minibatch size (integer >= 1) or None for the full batch.
        sampling: "iid" or "epoch" (see :func:`sgd`).

    Raises:
        TypeError: a non-number hyperparameter, a non-bool ``decoupled``, a non-integer ``batch_size``.
        ValueError: values out of range or non-finite (named in the message).
    """
    return OptimizerSpec("adam", _positive(lr, "lr"), _batch(batch_size), _sampling(sampling),
                         beta1=_unit_interval(beta1, "beta1"), beta2=_unit_interval(beta2, "beta2"),
                         eps=_nonneg(eps, "eps"), weight_decay=_nonneg(weight_decay, "weight_decay"),
                         decoupled=check_bool("decoupled", decoupled))


class minibatch_sampler:  # noqa: N801 - used like a function
    """The minibatch index sequence of a spec over n samples, drawn from ``rng`` step by step.

    ``sampler(n_steps)`` returns an (n_steps, b) float array of sample indices (sorted within each
    batch). It is stateful (epoch sampling keeps its position), and the sequence depends only on
    the generator's seed, never on how the steps are requested. For full-batch specs b = 0.

    "iid": each step an independent uniformly random subset of size b, the b smallest of n
    uniform keys (one row of ``rng.random((steps, n))`` per step).
    "epoch": at the start of each epoch a permutation ``rng.permutation(n)``; step j of the
    epoch takes its j-th block of b indices; n // b steps per epoch.
    """

    def __init__(self, spec: OptimizerSpec, n: int, rng: np.random.Generator):
        if not isinstance(spec, OptimizerSpec):
            raise TypeError(f"spec: expected a spec from rdsim.optim (gd, sgd, momentum, adam), got {type(spec).__name__}")
        n = check_int("n", n, 1)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
        spec.check_data_size(n)
        self.spec, self.n, self.rng = spec, int(n), rng
        self.b = spec.batch_size or 0
        self._perm = None
        self._pos = 0

    def __call__(self, n_steps: int) -> np.ndarray:
        n_steps = check_int("n_steps", n_steps, 0)
        b, n = self.b, self.n
        if b == 0:
            return np.empty((n_steps, 0))
        if self.spec.sampling == "iid":
            if b == n:
                return np.tile(np.arange(n, dtype=np.float64), (n_steps, 1))
            out = np.empty((n_steps, b))
            for start in range(0, n_steps, 256):  # bound memory: 256 rows of n keys at a time
                rows = min(256, n_steps - start)
                keys = self.rng.random((rows, n))
                idx = np.argpartition(keys, b - 1, axis=1)[:, :b]
                out[start:start + rows] = np.sort(idx, axis=1)
            return out
        per_epoch = n // b
        out = np.empty((n_steps, b))
        for t in range(n_steps):
            if self._perm is None or self._pos == per_epoch:
                self._perm = self.rng.permutation(n)
                self._pos = 0
            out[t] = np.sort(self._perm[self._pos * b:(self._pos + 1) * b])
            self._pos += 1
        return out


def noise_sampler(spec: OptimizerSpec, n: int, rng: np.random.Generator):
    """The noise sequence of an optimizer map (both backends): ``sampler(n_steps) -> (n_steps, m)``.

    Each row is the minibatch of one step (:class:`minibatch_sampler`), preceded for Adam by the
    step counter t = 1, 2, ... (its bias correction makes the map non-autonomous; carrying t in
    the driving sequence keeps it an RDS). Full-batch GD/momentum have m = 0.
    """
    batches = minibatch_sampler(spec, n, rng)
    if spec.kind != "adam":
        return batches
    count = [0]

    def sample(n_steps):
        t = np.arange(count[0] + 1, count[0] + n_steps + 1, dtype=np.float64)[:, None]
        count[0] += n_steps
        return np.hstack([t, batches(n_steps)])

    return sample
