"""Lyapunov spectra by QR (MATH.md §2): the public driver and its result."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from . import _config
from ._dimension import Dimension, kaplan_yorke_dimension
from ._engine import OK, STATE_NONFINITE, TANGENT_NONFINITE, run_segment
from ._linalg import make_orthonormalize
from ._systems import AbstractNumbaSystem, AbstractSystem, NoiseStream
from ._validate import UserFunctionError, call_user, check_bool, check_seed

__all__ = ["LyapunovCheckpoint", "LyapunovResult", "lyapunov_spectrum", "start_block"]

#: A QR whose min|R_ii| / max|R_ii| falls below this (about e^-30, ~ 400 machine epsilons) means
#: the tangent block lost rank: the trailing columns are rounding noise, their exponents garbage.
#: The run gets status "rank_lost" (and a RuntimeWarning).
RANK_LOST_RATIO: float = math.exp(-30.0)

#: Below this ratio (about e^-18, MATH.md §2: (lambda_1 - lambda_k) * qr_every <~ 18) the
#: trailing exponents lose accuracy: a RuntimeWarning advises a smaller qr_every.
RANK_WARN_RATIO: float = math.exp(-18.0)


@dataclasses.dataclass(frozen=True, repr=False)
class LyapunovCheckpoint:
    """Everything needed to continue a :func:`lyapunov_spectrum` run (frozen).

    A run split in two, ``a = lyapunov_spectrum(s, x0, n1, ...)`` then
    ``lyapunov_spectrum(s, None, n2, resume=a)``, gives the same exponents as one run of n1 + n2
    steps with the same arguments: bitwise for numba systems and the torch backend on CPU, as long
    as n1 is a multiple of ``qr_every`` (otherwise the first run's closing QR falls off the grid of
    the single run and the two differ at rounding level). The error bars come from the blocks of
    both runs (the first run's and the continuation's ``n_blocks`` blocks).

    Attributes:
        x: (dim,) the state after the run.
        Q: (tangent_dim, k) the orthonormal tangent block, columns in the loop's order (not sorted).
        sums: (k,) accumulated log |R_ii| in the loop's column order (float64).
        n_steps: accumulated steps so far (after the transient).
        noise_steps: noise vectors consumed so far (transient + accumulated steps); the
            continuation draws the noise stream of ``seed`` from there on.
        seed, qr_every: those of the run (the continuation keeps them).
        block_sums, block_steps: the error blocks so far.
        history, history_steps: running estimates (per step, loop column order) so far.
        n_qr: QR factorisations so far.
        rank_stats: (2,) the worst min|R_ii| / max|R_ii| seen and the number of zero blocks.
        system_name, dt: of the system (checked when resuming).

    ``save(path)`` writes a ``.npz`` file atomically; ``LyapunovCheckpoint.load(path)`` reads it;
    ``resume=`` also accepts the path directly.
    """

    x: np.ndarray
    Q: np.ndarray
    sums: np.ndarray
    n_steps: int
    noise_steps: int
    seed: int
    qr_every: int
    block_sums: np.ndarray
    block_steps: np.ndarray
    history: np.ndarray
    history_steps: np.ndarray
    n_qr: int = 0
    rank_stats: np.ndarray = dataclasses.field(default_factory=lambda: np.array([1.0, 0.0]))
    system_name: str = ""
    dt: float = 1.0

    @property
    def k(self) -> int:
        return int(self.Q.shape[1])

    def __repr__(self) -> str:
        return (f"LyapunovCheckpoint({self.system_name!s}: n_steps={self.n_steps}, noise_steps={self.noise_steps}, "
                f"k={self.k}, qr_every={self.qr_every}, seed={self.seed})")

    def save(self, path) -> None:
        """Write the checkpoint to ``path`` (``.npz``) atomically."""
        import io

        from ._io import atomic_write_bytes

        buf = io.BytesIO()
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}
        arrays["format"] = np.asarray("rdsim.LyapunovCheckpoint/1")
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path) -> "LyapunovCheckpoint":
        """Read a checkpoint written by :meth:`save` (ValueError if the file is not one)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = str(z["format"]) if "format" in z.files else None
                raw = {f.name: z[f.name] for f in dataclasses.fields(cls) if f.name in z.files}
        except Exception as err:  # OSError, zipfile.BadZipFile, pickled or truncated data, ...
            raise ValueError(f"resume: cannot read a LyapunovCheckpoint from {path}: {err}") from err
        if fmt != "rdsim.LyapunovCheckpoint/1" or len(raw) != len(dataclasses.fields(cls)):
            raise ValueError(f"resume: {path} is not an rdsim LyapunovCheckpoint file")
        kw = {}
        for name, v in raw.items():
            if name in ("n_steps", "noise_steps", "seed", "qr_every", "n_qr"):
                v = int(v)
            elif name == "system_name":
                v = str(v)
            elif name == "dt":
                v = float(v)
            kw[name] = v
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class LyapunovResult:
    """Result of :func:`lyapunov_spectrum` (frozen).

    Attributes:
        exponents: (k,) Lyapunov exponents per unit time, descending.
        stderr: (k,) standard errors from block means (std of block means / sqrt(n_blocks)).
        dimension: Kaplan-Yorke dimension of ``exponents`` (a float; ``dimension.lower_bound`` is
            True when k < dim and the sum of the k exponents is still non-negative).
        status: ``"ok"``, ``"diverged"`` (the state became non-finite, or with qr_every = 1 the
            Jacobian did) or ``"rank_lost"`` (the state stayed finite but the tangent block lost
            rank: a QR saw min|R_ii| / max|R_ii| below :data:`RANK_LOST_RATIO`, or the block
            overflowed between QRs; lower ``qr_every``). An exactly zero Jacobian is a result:
            status "ok" with exponents -inf.
        diverged_at: index of the step (counted from the start of the transient) at which the
            state or the tangent block became non-finite, or None.
        n_steps: accumulated steps (after the transient).
        history: (n_records, k) running estimates, columns in the order of ``exponents``.
        history_steps: (n_records,) accumulated steps at each record.
        x_final: the state after the run (the last finite state if it diverged).
        message: a human-readable account of the status.
        block_means: (n_blocks, k) per-block exponent estimates behind ``stderr``.
        Q_final: (dim, k) the final orthonormal tangent block (to continue a run).
        n_qr: number of QR factorisations performed.
        seed: the seed used.
        checkpoint: a :class:`LyapunovCheckpoint` to continue the run (``resume=``); None when
            the run did not end with status "ok".
    """

    exponents: np.ndarray
    stderr: np.ndarray
    dimension: Dimension
    status: str
    diverged_at: int | None
    n_steps: int
    history: np.ndarray
    history_steps: np.ndarray
    x_final: np.ndarray
    message: str = ""
    block_means: np.ndarray | None = None
    Q_final: np.ndarray | None = None
    n_qr: int = 0
    seed: int | None = None
    system_name: str = ""
    checkpoint: LyapunovCheckpoint | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def dimension_is_lower_bound(self) -> bool:
        return bool(getattr(self.dimension, "lower_bound", False))

    def __repr__(self) -> str:
        with np.printoptions(precision=5, suppress=False, threshold=12, edgeitems=4):
            ex = np.array2string(self.exponents, separator=", ")
            se = np.array2string(self.stderr, separator=", ")
        lb = " (lower bound)" if self.dimension_is_lower_bound else ""
        s = (f"LyapunovResult({self.system_name!s}: status={self.status!r}, n_steps={self.n_steps},\n"
             f"  exponents={ex},\n  stderr={se},\n  dimension={float(self.dimension):.5g}{lb}")
        if self.status != "ok":
            s += f",\n  message={self.message!r}"
        return s + ")"


def _check_int(value, argname, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argname}: expected an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{argname}: expected an integer >= {minimum}, got {value}")
    return int(value)


def start_block(dim: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthonormal (dim, k) block (QR of a Gaussian matrix), never identity columns."""
    q, r = np.linalg.qr(rng.standard_normal((dim, k)))
    return np.ascontiguousarray(q * np.sign(np.diag(r)))


def _seeds(seed):
    ss = np.random.SeedSequence(seed)
    block_ss, noise_ss = ss.spawn(2)
    return np.random.default_rng(block_ss), np.random.default_rng(noise_ss)


def lyapunov_spectrum(system: AbstractSystem, x0, n_steps: int, *, k: int | None = None,
                      transient: int = 0, qr_every: int = 1, seed: int = 0, n_blocks: int = 20,
                      record_every: int | None = None, progress: bool = False,
                      Q0=None, resume=None) -> LyapunovResult:
    """Lyapunov spectrum of a (random) dynamical system by QR-based tangent products.

    Starting from a seeded random orthonormal (d, k) block Q_0, for t = 0 .. T-1 the tangent block
    is pushed through the one-step Jacobians, M = Df(x_{t+q-1}, xi) ... Df(x_t, xi) Q_t
    (q = ``qr_every``), factorised M = QR, and the logs |R_ii| are accumulated (float64):
    lambda_i = sum log|R_ii| / (T dt). The transient re-orthonormalises without accumulating.
    Error bars: the accumulation is split into ``n_blocks`` consecutive blocks;
    stderr = std(block means) / sqrt(n_blocks). For numba systems the whole loop runs in numba.

    Args:
        system: any rdsim system (:class:`rdsim.Map`, :class:`rdsim.Flow`, an optimizer map, ...).
        x0: initial state, shape (dim,); None uses the system's default (``system.x0``) if any.
        n_steps: accumulated steps after the transient (>= 1).
        k: number of exponents (1 <= k <= dim); None for the full spectrum.
        transient: steps to discard first (>= 0); the tangent block is aligned meanwhile.
        qr_every: steps between QR factorisations (>= 1). Keep (lambda_1 - lambda_k) * qr_every * dt
            below about 18 so the block stays well conditioned.
        seed: seeds both the start block and the noise sequence (independent streams).
        n_blocks: blocks for the error bars (>= 2; reduced if there are fewer QR steps).
        record_every: steps between running-estimate records (rounded up to a multiple of
            ``qr_every``); None records about 200 times.
        progress: show a tqdm progress bar.
        Q0: optional user start block (dim, k); it is orthonormalised.
        resume: continue an earlier run: its :class:`LyapunovResult`, its ``checkpoint`` or the
            path of a saved checkpoint (:meth:`LyapunovCheckpoint.save`). ``x0`` must be None,
            ``transient`` 0 and ``Q0`` None; ``k``, ``qr_every`` and ``seed`` are the checkpoint's
            (passing other values raises). ``n_steps`` more steps are accumulated and the result
            covers both runs: split at a multiple of ``qr_every``, the exponents equal those of
            one run of the total length (bitwise for numba systems and the torch backend on CPU).

    Returns:
        LyapunovResult. A run whose state or tangent becomes non-finite returns status
        "diverged" with the step index; it does not raise.

    Raises:
        ValueError / TypeError: invalid arguments (named in the message).

    Example:
        >>> import rdsim
        >>> res = rdsim.lyapunov_spectrum(rdsim.systems.henon(), [0.1, 0.1], 100_000, transient=1000)
        >>> [round(float(v), 2) for v in res.exponents]
        [0.42, -1.62]

        Continue it for as many steps again (equal to one run of 200,000 steps):

        >>> more = rdsim.lyapunov_spectrum(rdsim.systems.henon(), None, 100_000, resume=res)
        >>> more.n_steps
        200000

    References:
        Benettin, Galgani, Giorgilli, Strelcyn (1980); Shimada & Nagashima (1979);
        Geist, Parlitz & Lauterborn (1990).
    """
    if not isinstance(system, AbstractSystem):
        raise TypeError(f"system: expected an rdsim system (Map, Flow, optimizer map, ...), got {type(system).__name__}")
    d = system.tangent_dim
    n_steps = _check_int(n_steps, "n_steps", 1)
    transient = _check_int(transient, "transient", 0)
    qr_every = _check_int(qr_every, "qr_every", 1)
    n_blocks = _check_int(n_blocks, "n_blocks", 2)
    seed = check_seed(seed)
    progress = check_bool("progress", progress)
    k_arg = k
    if k is None:
        k = d
    k = _check_int(k, "k", 1)
    if k > d:
        raise ValueError(f"k: expected 1 <= k <= dim = {d}, got {k}")
    ck = None
    if resume is not None:
        ck = _as_checkpoint(resume)
        _check_resume(system, ck, x0, transient, Q0, k_arg, qr_every, seed)
        k, qr_every, seed = ck.k, ck.qr_every, ck.seed
    if record_every is None:
        record_every = max(1, n_steps // 200)
    else:
        record_every = _check_int(record_every, "record_every", 1)
    record_every = qr_every * math.ceil(record_every / qr_every)
    x = system.initial_state(x0) if ck is None else np.array(ck.x, dtype=np.float64)

    block_rng, noise_rng = _seeds(seed)
    if ck is not None:
        Q = np.array(ck.Q, dtype=np.float64, order="C")
    elif Q0 is None:
        Q = start_block(d, k, block_rng)
    else:
        Q0 = np.asarray(Q0, dtype=np.float64)
        if Q0.shape != (d, k):
            raise ValueError(f"Q0: expected shape ({d}, {k}), got {Q0.shape}")
        if not np.all(np.isfinite(Q0)):
            raise ValueError("Q0: must be finite")
        q, r = np.linalg.qr(Q0)
        if np.min(np.abs(np.diag(r))) <= 1e-12 * max(1.0, np.max(np.abs(np.diag(r)))):
            raise ValueError("Q0: columns must be linearly independent")
        Q = np.ascontiguousarray(q)
    noise = NoiseStream(system, noise_rng)
    if ck is not None:
        _skip_noise(noise, ck.noise_steps)

    n_qr_acc = (n_steps + qr_every - 1) // qr_every
    n_blocks = max(1, min(n_blocks, n_qr_acc))
    n_hist = n_steps // record_every + 2
    state = dict(rank_stats=np.array([1.0, 0.0]), sums=np.zeros(k), block_sums=np.zeros((n_blocks, k)), block_steps=np.zeros(n_blocks),
                 hist=np.zeros((n_hist, k)), hist_steps=np.zeros(n_hist, dtype=np.int64))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=transient + n_steps, desc=f"lyapunov {system.name}", unit="step", leave=False)

    if ck is not None:
        state["sums"][:] = ck.sums
        state["rank_stats"][:] = ck.rank_stats
        state["n_qr"] = ck.n_qr

    if isinstance(system, AbstractNumbaSystem):
        runner = _run_numba
    elif hasattr(system, "_run_phase"):
        # systems with their own fast loop (the torch backend keeps state and block on its device)
        def runner(system, *args):
            try:
                return system._run_phase(*args)
            except (UserFunctionError, ValueError, TypeError):
                raise
            except Exception as err:  # the model's forward or loss_fn raised inside the loop
                raise UserFunctionError("model/loss_fn", err, where=system.name) from err
    else:
        runner = _run_python
    status, fail_at, hist_count = OK, -1, 0
    try:
        phases = ((transient, False), (n_steps, True))
        done_before = 0
        for length, acc in phases:
            if length == 0:
                continue
            status, fail_at, hist_count = runner(system, x, Q, noise, length, qr_every, acc, n_blocks,
                                                 record_every, state, hist_count, bar)
            if status != OK:
                fail_at += done_before
                break
            done_before += length
    finally:
        if bar is not None:
            bar.close()

    dt = system.dt
    sums, bsums, bsteps = state["sums"], state["block_sums"], state["block_steps"]
    hist_raw = state["hist"][:hist_count]
    hist_steps = state["hist_steps"][:hist_count].copy()
    n_this = n_steps
    if ck is not None:
        # the loop recorded (all sums) / (steps of this run): rescale to the whole run, prepend
        hist_raw = hist_raw * (hist_steps / (hist_steps + ck.n_steps))[:, None]
        hist_raw = np.concatenate([np.asarray(ck.history, dtype=np.float64).reshape(-1, k), hist_raw])
        hist_steps = np.concatenate([np.asarray(ck.history_steps, dtype=np.int64), hist_steps + ck.n_steps])
        bsums = np.concatenate([np.asarray(ck.block_sums, dtype=np.float64).reshape(-1, k), bsums])
        bsteps = np.concatenate([np.asarray(ck.block_steps, dtype=np.float64), bsteps])
        n_steps = n_steps + ck.n_steps
    hist = hist_raw / dt
    checkpoint = None
    if status == OK:
        checkpoint = LyapunovCheckpoint(
            x=x.copy(), Q=Q.copy(), sums=sums.copy(), n_steps=n_steps,
            noise_steps=(ck.noise_steps if ck is not None else transient) + n_this, seed=seed,
            qr_every=qr_every, block_sums=bsums.copy(), block_steps=bsteps.copy(), history=hist_raw.copy(),
            history_steps=hist_steps.copy(), n_qr=int(state.get("n_qr", 0)),
            rank_stats=state["rank_stats"].copy(), system_name=system.name, dt=float(dt))
    worst_ratio, n_zero_qr = float(state["rank_stats"][0]), int(state["rank_stats"][1])
    rank_lost = False
    if status == TANGENT_NONFINITE and qr_every > 1:
        # the state is finite: the block overflowed (or underflowed) between two QRs
        rank_lost = True
    if status == OK or rank_lost:
        exps = sums / (n_steps * dt)
        used = bsteps > 0
        means = bsums[used] / (bsteps[used, None] * dt)
        if means.shape[0] >= 2:
            with np.errstate(invalid="ignore"):  # -inf exponents (a zero Jacobian): stderr NaN
                stderr = means.std(axis=0, ddof=1) / np.sqrt(means.shape[0])
        else:
            stderr = np.full(k, np.nan)
        order = np.argsort(-exps, kind="stable")
        exps, stderr, means, hist = exps[order], stderr[order], means[:, order], hist[:, order]
        Q = Q[:, order]
        dim_val = kaplan_yorke_dimension(exps, dim=d) if np.all(np.isfinite(exps)) else \
            _dimension_with_neg_inf(exps, d)
        msg = "ok"
        res_status, div_at = "ok", None
        gap = -math.log(worst_ratio) if worst_ratio > 0 else math.inf
        if rank_lost:
            exps = np.full(k, np.nan)
            stderr = np.full(k, np.nan)
            dim_val = Dimension(np.nan)
            res_status = "rank_lost"
            msg = (f"the tangent block became non-finite at step {fail_at} while the state stayed finite: "
                   f"it overflowed between two QRs (qr_every={qr_every}), or the Jacobian is non-finite "
                   f"there; lower qr_every so that (lambda_1 - lambda_k) * qr_every * dt stays below about 18")
        elif worst_ratio < RANK_LOST_RATIO:
            res_status = "rank_lost"
            msg = (f"the tangent block lost rank: a QR saw min|R_ii| / max|R_ii| = {worst_ratio:.1e} "
                   f"(a log gap of {gap:.0f}, i.e. (lambda_1 - lambda_k) * qr_every ~ {gap:.0f} > 30): "
                   f"the trailing exponents are rounding noise (lambda_1 is still sound); lower "
                   f"qr_every (now {qr_every}) so that the gap stays below about 18, or, if the Jacobian "
                   f"is singular, the trailing exponents are -inf")
        elif worst_ratio < RANK_WARN_RATIO:
            msg = (f"ok, but a QR saw min|R_ii| / max|R_ii| = {worst_ratio:.1e} ((lambda_1 - lambda_k) * "
                   f"qr_every ~ {gap:.0f} > 18): the trailing exponents may be inaccurate; lower qr_every "
                   f"(now {qr_every})")
        elif n_zero_qr:
            msg = (f"ok: the tangent block was exactly zero at {n_zero_qr} QR(s) (a zero Jacobian), "
                   f"so the exponents are -inf")
        if msg != "ok" and (res_status == "rank_lost" or worst_ratio < RANK_WARN_RATIO):
            warnings.warn(f"lyapunov_spectrum({system.name}): {msg}", RuntimeWarning, stacklevel=2)
    else:
        what = "state" if status == STATE_NONFINITE else "tangent block"
        msg = f"the {what} became non-finite (or degenerate) at step {fail_at}"
        exps = np.full(k, np.nan)
        stderr = np.full(k, np.nan)
        means = None
        dim_val = Dimension(np.nan)
        res_status, div_at = "diverged", int(fail_at)
    return LyapunovResult(exponents=exps, stderr=stderr, dimension=dim_val, status=res_status,
                          diverged_at=div_at, n_steps=n_steps, history=hist, history_steps=hist_steps,
                          x_final=x, message=msg, block_means=means, Q_final=Q,
                          n_qr=int(state.get("n_qr", 0)), seed=seed, system_name=system.name,
                          checkpoint=checkpoint if res_status == "ok" else None)


def _as_checkpoint(resume) -> LyapunovCheckpoint:
    import os

    if isinstance(resume, LyapunovCheckpoint):
        return resume
    if isinstance(resume, LyapunovResult):
        if resume.checkpoint is None:
            raise ValueError(f"resume: the run ended with status {resume.status!r}; only a run with status "
                             f"'ok' can be continued")
        return resume.checkpoint
    if isinstance(resume, (str, os.PathLike)):
        return LyapunovCheckpoint.load(resume)
    raise TypeError(f"resume: expected a LyapunovResult, a LyapunovCheckpoint or a path, got {type(resume).__name__}")


def _check_resume(system, ck, x0, transient, Q0, k, qr_every, seed):
    if x0 is not None:
        raise ValueError("x0: must be None when resuming (the run continues from the checkpoint's state)")
    if transient:
        raise ValueError(f"transient: must be 0 when resuming, got {transient}")
    if Q0 is not None:
        raise ValueError("Q0: must be None when resuming (the run continues from the checkpoint's block)")
    d = system.tangent_dim
    if ck.Q.shape[0] != d or np.asarray(ck.x).shape != (system.dim,):
        raise ValueError(f"resume: the checkpoint has a state of size {np.asarray(ck.x).shape[0]} and a block of "
                         f"{ck.Q.shape[0]} rows; this system has dim {system.dim} and tangent_dim {d}")
    if ck.system_name and ck.system_name != system.name:
        raise ValueError(f"resume: the checkpoint is of system {ck.system_name!r}, not {system.name!r}")
    if not math.isclose(float(ck.dt), float(system.dt), rel_tol=0, abs_tol=0):
        raise ValueError(f"resume: the checkpoint has dt = {ck.dt}, the system {system.dt}")
    if k is not None and k != ck.k:
        raise ValueError(f"k: the checkpoint has k = {ck.k}, got {k}")
    if qr_every not in (1, ck.qr_every):
        raise ValueError(f"qr_every: the checkpoint has qr_every = {ck.qr_every}, got {qr_every}")
    if seed not in (0, ck.seed):
        raise ValueError(f"seed: the checkpoint has seed = {ck.seed}, got {seed}")


def _skip_noise(noise, n):
    """Advance a NoiseStream by n steps (in chunks, so memory stays bounded)."""
    chunk = max(1, int(noise.chunk))
    while n > 0:
        m = min(n, chunk)
        noise.take(m)
        n -= m


def _dimension_with_neg_inf(exps, d):
    """Kaplan-Yorke dimension when some exponents are -inf (a zero Jacobian) or not finite."""
    if np.any(np.isnan(exps)) or np.any(exps == np.inf):
        return Dimension(np.nan)
    return kaplan_yorke_dimension(exps, dim=d)


def _run_numba(system, x, Q, noise, n_total, qr_every, accumulate, n_blocks, record_every, state,
               hist_count, bar):
    d, k = Q.shape
    x_buf, V_buf, work, wv = system._buffers(k)
    rdiag = np.zeros(k)
    ortho = make_orthonormalize(d, k)
    seg = _config.SEGMENT_STEPS
    done = 0
    while done < n_total:
        n = min(seg, n_total - done)
        xi = call_user("noise", noise.take, n, where=system.name)
        try:
            status, fail_at, hist_count = run_segment(
                system._advance, ortho, system._kernel_params, x, Q, xi, n, done, n_total, qr_every, accumulate,
                state["sums"], state["block_sums"], state["block_steps"], n_blocks,
                record_every if accumulate else 0, state["hist"], state["hist_steps"], hist_count,
                x_buf, V_buf, work, wv, rdiag, state["rank_stats"])
        except Exception as err:  # a user step or jacobian raised inside the compiled loop
            raise UserFunctionError("step/jacobian", err,
                                    where=f"{system.name}, within steps {done}..{done + n - 1} of the phase") from err
        end = done + n
        state["n_qr"] = state.get("n_qr", 0) + (end // qr_every - done // qr_every) + \
            (1 if end == n_total and n_total % qr_every else 0)
        if bar is not None:
            bar.update(n)
        if status != OK:
            return status, fail_at, hist_count
        done = end
    return OK, -1, hist_count


def _run_python(system, x, Q, noise, n_total, qr_every, accumulate, n_blocks, record_every, state,
                hist_count, bar):
    """Generic driver for systems without a numba kernel (e.g. torch): same algorithm, Python loop."""
    sums, bsums, bsteps = state["sums"], state["block_sums"], state["block_steps"]
    hist, hist_steps = state["hist"], state["hist_steps"]
    for g in range(n_total):
        xi = call_user("noise", noise.take, 1, step=g, where=system.name)[0]
        V = np.asarray(call_user("tangent", system.tangent, x, xi, Q, step=g, where=system.name), dtype=np.float64)
        x_new = np.asarray(call_user("step", system.step, x, xi, step=g, where=system.name), dtype=np.float64)
        if not np.all(np.isfinite(x_new)):
            return STATE_NONFINITE, g, hist_count
        x[:] = x_new
        Q[:, :] = V
        done = g + 1
        if done % qr_every == 0 or done == n_total:
            if not np.all(np.isfinite(Q)):
                from ._engine import TANGENT_NONFINITE
                return TANGENT_NONFINITE, g, hist_count
            q, r = np.linalg.qr(Q)
            rd = np.abs(np.diag(r))
            Q[:, :] = q
            state["n_qr"] = state.get("n_qr", 0) + 1
            rs = state.get("rank_stats")
            if rs is not None and np.all(np.isfinite(rd)):
                if rd.max() > 0:
                    rs[0] = min(rs[0], rd.min() / rd.max())
                else:
                    rs[1] += 1
            if not np.all(np.isfinite(rd)):
                from ._engine import TANGENT_NONFINITE
                return TANGENT_NONFINITE, g, hist_count
            if accumulate:
                b = (g * n_blocks) // n_total
                bsteps[b] += qr_every if done % qr_every == 0 else done % qr_every
                lr = np.log(rd)
                sums += lr
                bsums[b] += lr
                if record_every > 0 and (done % record_every == 0 or done == n_total) and hist_count < hist.shape[0]:
                    hist[hist_count] = sums / done
                    hist_steps[hist_count] = done
                    hist_count += 1
        if bar is not None:
            bar.update(1)
    return OK, -1, hist_count
