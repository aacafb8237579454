"""The numba QR engine (private): Benettin/Shimada-Nagashima tangent products (MATH.md §2).

The engine is one jitted loop, specialised on a system's ``advance`` kernel:

    advance(x, params, xi, V, x_out, V_out, work, wv)

writes f(x, xi) into ``x_out`` and Df(x, xi) @ V into ``V_out`` (V is the d x k tangent block);
``work`` (n_work, d, k) and ``wv`` (n_wv, d) are scratch buffers the system asked for. Every
numba system in rdsim (user maps, flows, optimizer maps) is such a kernel; the loop, QR,
accumulation, error blocks, history and divergence checks live here once.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._config import NUMBA_OPTIONS

# status codes returned by the kernels
OK = 0
STATE_NONFINITE = 1
TANGENT_NONFINITE = 2


@nb.njit(**NUMBA_OPTIONS)
def run_segment(advance, orthonormalize, params, x, Q, noise, n, step0, n_total, qr_every, accumulate,
                sums, block_sums, block_steps, n_blocks, record_every, hist, hist_steps,
                hist_count, x_buf, V_buf, work, wv, rdiag):
    """Advance ``n`` steps (global indices step0 .. step0+n-1 of a phase of n_total steps).

    ``orthonormalize(Q, rdiag)`` is the QR kernel for the block's size (see
    :func:`rdsim._linalg.make_orthonormalize`). Re-orthonormalises after every ``qr_every`` steps of the phase and at its last step. When
    ``accumulate`` is true the logs |R_ii| go into ``sums`` (k,) and into the error block of the
    step (block b holds steps g with floor(g * n_blocks / n_total) = b); every ``record_every``
    steps the running estimate (per step) is written to ``hist``. ``x`` and ``Q`` are updated in
    place; the buffers are swapped internally rather than copied.

    Returns (status, step index of failure or -1, number of history records written).
    """
    d = x.shape[0]
    k = Q.shape[1]
    xc, xn = x, x_buf
    Qc, Qn = Q, V_buf
    status = OK
    fail = -1
    since_qr = step0 % qr_every
    b = (step0 * n_blocks) // n_total
    next_b = -((-(b + 1) * n_total) // n_blocks)  # ceil((b+1) * n_total / n_blocks)
    since_rec = step0 % record_every if record_every > 0 else 0
    for t in range(n):
        g = step0 + t
        advance(xc, params, noise[t], Qc, xn, Qn, work, wv)
        finite = True
        for i in range(d):
            if not np.isfinite(xn[i]):
                finite = False
        if not finite:
            status = STATE_NONFINITE
            fail = g
            break
        xc, xn = xn, xc
        Qc, Qn = Qn, Qc
        since_qr += 1
        last = g + 1 == n_total
        if since_qr == qr_every or last:
            orthonormalize(Qc, rdiag)
            ok = True
            for j in range(k):
                r = rdiag[j]
                if not (r > 0.0 and r < np.inf):
                    ok = False
            if not ok:
                status = TANGENT_NONFINITE
                fail = g
                break
            if accumulate:
                while g >= next_b:
                    b += 1
                    next_b = -((-(b + 1) * n_total) // n_blocks)
                block_steps[b] += since_qr
                for j in range(k):
                    lr = np.log(rdiag[j])
                    sums[j] += lr
                    block_sums[b, j] += lr
                if record_every > 0:
                    since_rec += since_qr
                    if since_rec >= record_every or last:
                        since_rec = 0
                        if hist_count < hist.shape[0]:
                            for j in range(k):
                                hist[hist_count, j] = sums[j] / (g + 1)
                            hist_steps[hist_count] = g + 1
                            hist_count += 1
            since_qr = 0
    if xc is not x:
        for i in range(d):
            x[i] = xc[i]
    if Qc is not Q:
        for i in range(Q.shape[0]):
            for j in range(k):
                Q[i, j] = Qc[i, j]
    return status, fail, hist_count
