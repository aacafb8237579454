"""The numba QR engine (private): Benettin/Shimada-Nagashima tangent products (MATH.md §2).

The engine is one jitted loop, compiled for each system's ``advance`` kernel and block size:

    advance(x, params, xi, V, x_out, V_out, work, wv)

writes f(x, xi) into ``x_out`` and Df(x, xi) @ V into ``V_out`` (V is the d x k tangent block);
``work`` (n_work, d, k) and ``wv`` (n_wv, d) are scratch buffers the system asked for. Every
numba system in rdsim (user maps, flows, optimizer maps) is such a kernel; the loop, QR,
accumulation, error blocks, history and divergence checks live here once.

Speed on small systems: the loop is a closure over ``advance``, the QR kernel and the sizes
(d, k), so the sizes are compile-time constants and ``advance`` (the Map factory jits it with
``inline="always"``) is inlined into the loop. The loop works on private copies of the state, the
block, their buffers and the scratch, packed into one array with a fixed layout (copied back at
the end of the segment); the noise row is copied into it too. For a user map written in the
in-place or the tuple-returning style (see :class:`rdsim.Map`) the loop body has no reference
counting, no allocation and no function call left: a 2-d map runs at about 0.5-0.6 of a
hand-unrolled scalar numba kernel (``benchmarks/bench_engine.py``).

Speed on large systems: the QR kernel is chosen by the block size (``rdsim._linalg.qr_path``:
MGS for thin blocks, LAPACK when d * k**2 > ``QR_MGS_MAX_WORK``) and a Map's tangent push is a
BLAS product above ``SMALL_DIM_MAX``, so a full spectrum at d = 500 costs about what the naive
numpy loop does (J @ Q, np.linalg.qr), not 20x more.
"""

from __future__ import annotations

import functools

import numba as nb
import numpy as np

from ._config import NUMBA_OPTIONS

# status codes returned by the kernels
OK = 0
STATE_NONFINITE = 1
TANGENT_NONFINITE = 2


def run_segment(advance, orthonormalize, params, x, Q, noise, n, step0, n_total, qr_every, accumulate,
                sums, block_sums, block_steps, n_blocks, record_every, hist, hist_steps,
                hist_count, x_buf, V_buf, work, wv, rdiag, rank_stats=None):
    """Advance ``n`` steps (global indices step0 .. step0+n-1 of a phase of n_total steps).

    ``orthonormalize(Q, rdiag)`` is the QR kernel for the block's size (see
    :func:`rdsim._linalg.make_orthonormalize`). Re-orthonormalises after every ``qr_every`` steps
    of the phase and at its last step. When ``accumulate`` is true the logs |R_ii| go into
    ``sums`` (k,) and into the error block of the step (block b holds steps g with
    floor(g * n_blocks / n_total) = b); every ``record_every`` steps the running estimate (per
    step) is written to ``hist``. ``x`` and ``Q`` are updated in place.

    ``rank_stats`` (2,) is updated in place with what the QRs saw of the block's conditioning:
    ``rank_stats[0]`` = the smallest min|R_ii| / max|R_ii| over the factorisations with some
    non-zero column (a lower bound of 1 / cond(R); near machine epsilon the block lost rank),
    ``rank_stats[1]`` += the number of factorisations whose block was exactly zero (a zero
    Jacobian: the exponents are -inf, a result). A zero |R_ii| is accumulated as log 0 = -inf.

    Returns (status, step index of failure or -1, number of history records written).
    """
    if rank_stats is None:
        rank_stats = np.array([1.0, 0.0])
    kernel = segment_kernel(advance, orthonormalize, x.shape[0], Q.shape[0], Q.shape[1])
    return kernel(params, x, Q, noise, n, step0, n_total, qr_every, accumulate, sums, block_sums,
                  block_steps, n_blocks, record_every, hist, hist_steps, hist_count, x_buf, V_buf,
                  work, wv, rdiag, rank_stats)


@functools.lru_cache(maxsize=256)
def segment_kernel(advance, orthonormalize, d, dt, k):
    """The jitted segment loop for one ``advance`` kernel, QR kernel and sizes.

    d: state dimension, dt: tangent dimension (rows of the block), k: columns of the block. The
    sizes are closure constants, so LLVM unrolls the per-step loops over them.

    The loop works on private copies of everything it writes per step (state, block, their
    buffers, the scratch of ``advance``, the noise row, |R_ii|, the sums), packed into one
    contiguous array: a fixed layout keeps the store-to-load traffic of a small system clear of
    false address aliasing between unrelated small arrays, which otherwise makes the speed of a
    2 x 2 system depend on where numpy happened to put them (up to 1.7x on AMD Zen).
    The accumulation order is unchanged, so the results are identical to the last bit.
    """
    dk = dt * k

    @nb.njit(**NUMBA_OPTIONS)
    def kernel(params, x, Q, noise, n, step0, n_total, qr_every, accumulate, sums, block_sums,
               block_steps, n_blocks, record_every, hist, hist_steps, hist_count, x_buf, V_buf,
               work, wv, rdiag, rank_stats):
        m = noise.shape[1]
        n_wv = wv.shape[0] * wv.shape[1]
        n_work = work.shape[0] * work.shape[1] * work.shape[2]
        # layout of the private arena (its entries are zero at the start, as wv and work need
        # not be: a Map's in-place jacobian may leave its structural zeros alone)
        o_xb = d
        o_Q = o_xb + d
        o_V = o_Q + dk
        o_rd = o_V + dk
        o_sum = o_rd + k
        o_bs = o_sum + k
        o_xi = o_bs + k
        o_wv = o_xi + m
        o_work = o_wv + n_wv
        arena = np.zeros(o_work + n_work)
        xa = arena[0:d]
        xb = arena[o_xb:o_Q]
        Qa = arena[o_Q:o_V].reshape((dt, k))
        Vb = arena[o_V:o_rd].reshape((dt, k))
        rd = arena[o_rd:o_sum]
        sm = arena[o_sum:o_bs]
        bs = arena[o_bs:o_xi]  # running sums of the current error block
        xi = arena[o_xi:o_wv]
        wva = arena[o_wv:o_work].reshape(wv.shape)
        worka = arena[o_work:].reshape(work.shape)
        for i in range(d):
            xa[i] = x[i]
        for i in range(dt):
            for j in range(k):
                Qa[i, j] = Q[i, j]
        for j in range(k):
            sm[j] = sums[j]
        status = OK
        fail = -1
        worst = rank_stats[0]
        n_zero = 0
        since_qr = step0 % qr_every
        b = (step0 * n_blocks) // n_total
        next_b = -((-(b + 1) * n_total) // n_blocks)  # ceil((b+1) * n_total / n_blocks)
        for j in range(k):
            bs[j] = block_sums[b, j]
        b_steps = 0  # steps of block b accumulated in this call (added to block_steps[b] once)
        since_rec = step0 % record_every if record_every > 0 else 0
        for t in range(n):
            g = step0 + t
            for i in range(m):
                xi[i] = noise[t, i]
            advance(xa, params, xi, Qa, xb, Vb, worka, wva)
            finite = True
            for i in range(d):
                if not np.isfinite(xb[i]):
                    finite = False
            if not finite:
                status = STATE_NONFINITE
                fail = g
                break
            for i in range(d):
                xa[i] = xb[i]
            since_qr += 1
            last = g + 1 == n_total
            if since_qr == qr_every or last:
                orthonormalize(Vb, rd)
                for i in range(dt):
                    for j in range(k):
                        Qa[i, j] = Vb[i, j]
                ok = True
                rmax = 0.0
                rmin = np.inf
                for j in range(k):
                    r = rd[j]
                    if not (r >= 0.0 and r < np.inf):
                        ok = False
                    if r > rmax:
                        rmax = r
                    if r < rmin:
                        rmin = r
                if rmax > 0.0:
                    if rmin < worst * rmax:
                        worst = rmin / rmax
                else:
                    n_zero += 1
                if not ok:
                    status = TANGENT_NONFINITE
                    fail = g
                    break
                if accumulate:
                    if g >= next_b:
                        for j in range(k):
                            block_sums[b, j] = bs[j]
                        block_steps[b] += b_steps
                        b_steps = 0
                        while g >= next_b:
                            b += 1
                            next_b = -((-(b + 1) * n_total) // n_blocks)
                        for j in range(k):
                            bs[j] = block_sums[b, j]
                    b_steps += since_qr
                    for j in range(k):
                        lr = np.log(rd[j])
                        sm[j] += lr
                        bs[j] += lr
                    if record_every > 0:
                        since_rec += since_qr
                        if since_rec >= record_every or last:
                            since_rec = 0
                            if hist_count < hist.shape[0]:
                                for j in range(k):
                                    hist[hist_count, j] = sm[j] / (g + 1)
                                hist_steps[hist_count] = g + 1
                                hist_count += 1
                since_qr = 0
            else:
                for i in range(dt):
                    for j in range(k):
                        Qa[i, j] = Vb[i, j]
        # write back (on failure: the last finite state, and the block as it stands)
        for i in range(d):
            x[i] = xa[i]
        for i in range(dt):
            for j in range(k):
                Q[i, j] = Qa[i, j]
        if accumulate:
            for j in range(k):
                sums[j] = sm[j]
                block_sums[b, j] = bs[j]
            block_steps[b] += b_steps
        for j in range(k):
            rdiag[j] = rd[j]
        rank_stats[0] = worst
        rank_stats[1] += n_zero
        return status, fail, hist_count

    return kernel
