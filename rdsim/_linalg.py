"""Allocation-free dense kernels used inside the numba engine (private).

Small blocks get QR kernels specialised on their sizes (:func:`make_orthonormalize`): up to
``SCALAR_QR_MAX_SIZE`` entries the whole block is held in local scalars (generated straight-line
code, so a 2 x 2 Gram-Schmidt is a dozen register operations); up to ``SMALL_DIM_MAX`` rows the
sizes are closure constants, so LLVM unrolls the short loops. Every variant runs the same modified
Gram-Schmidt with the same operation order, so they agree to the last bit. Larger blocks use the
generic kernels. Which QR a block gets is :func:`qr_path` (d, k): MGS for thin blocks, LAPACK when
d * k**2 exceeds ``QR_MGS_MAX_WORK``.
"""

from __future__ import annotations

import functools

import numba as nb
import numpy as np

from ._config import NUMBA_OPTIONS, QR_MGS_MAX_WORK, SMALL_DIM_MAX

#: Re-orthogonalise a column once when Gram-Schmidt left less than this fraction of its squared
#: norm (Kahan/Parlett "twice is enough": ||after|| < ||before|| / sqrt(2)); the block is then
#: orthogonal to machine precision.
REORTH_FRACTION: float = 0.5

#: Largest block (d * k entries) whose QR keeps the block in local scalars (generated code).
SCALAR_QR_MAX_SIZE: int = 16


@nb.njit(**NUMBA_OPTIONS)
def matmul_into(A, B, out):
    """out <- A @ B for A (d, n), B (n, k). Small sizes use loops; large ones BLAS (dgemm into out)."""
    d, n = A.shape
    k = B.shape[1]
    if d > SMALL_DIM_MAX or n > SMALL_DIM_MAX:
        np.dot(np.ascontiguousarray(A), np.ascontiguousarray(B), out)
        return
    for i in range(d):
        for j in range(k):
            out[i, j] = 0.0
        for p in range(n):
            a = A[i, p]
            for j in range(k):
                out[i, j] += a * B[p, j]


@nb.njit(**NUMBA_OPTIONS)
def _qr_lapack(M, rdiag):
    k = M.shape[1]
    q, r = np.linalg.qr(np.ascontiguousarray(M))
    for j in range(k):
        rdiag[j] = abs(r[j, j])
    M[:, :] = q


def _mgs_source():
    # one implementation of the small QR, compiled either generic (sizes from M.shape) or with
    # constant sizes (see make_orthonormalize)
    def mgs(M, rdiag, d, k):
        for j in range(k):
            # modified Gram-Schmidt, repeated once when the column lost more than half of its
            # squared norm ("twice is enough", Kahan/Parlett): orthogonal to machine precision
            nrm0 = 0.0
            for p in range(d):
                nrm0 += M[p, j] * M[p, j]
            nrm = nrm0
            if j > 0:
                for sweep in range(2):
                    for i in range(j):
                        dot = 0.0
                        for p in range(d):
                            dot += M[p, i] * M[p, j]
                        for p in range(d):
                            M[p, j] -= dot * M[p, i]
                    nrm = 0.0
                    for p in range(d):
                        nrm += M[p, j] * M[p, j]
                    if nrm > REORTH_FRACTION * nrm0:
                        break
                    nrm0 = nrm
            nrm = np.sqrt(nrm)
            rdiag[j] = nrm
            if nrm > 0.0:
                inv = 1.0 / nrm
                for p in range(d):
                    M[p, j] *= inv

    return mgs


_mgs = nb.njit(**NUMBA_OPTIONS)(_mgs_source())
_mgs_inline = nb.njit(inline="always", **NUMBA_OPTIONS)(_mgs_source())


@nb.njit(**NUMBA_OPTIONS)
def orthonormalize(M, rdiag):
    """Thin QR of M (d, k) in place: M <- Q, rdiag <- |diag R|.

    Blocks with d * k**2 <= QR_MGS_MAX_WORK (see :func:`qr_path`) use modified Gram-Schmidt with
    conditional re-orthogonalisation (a column that collapses to zero is left as zeros with
    rdiag 0; the caller reports it); wider ones LAPACK.
    """
    d, k = M.shape
    if d * k * k > QR_MGS_MAX_WORK:
        _qr_lapack(M, rdiag)
    else:
        _mgs(M, rdiag, d, k)


@nb.njit(**NUMBA_OPTIONS)
def _orthonormalize_mgs(M, rdiag):
    d, k = M.shape
    _mgs(M, rdiag, d, k)


def _scalar_mgs_source(d: int, k: int) -> str:
    """Source of ``ortho(M, rdiag)`` for a (d, k) block held in local scalars.

    The same modified Gram-Schmidt as :func:`orthonormalize`, operation for operation (sums
    accumulate left to right, the re-orthogonalisation test is the same), unrolled by hand so
    the block lives in registers instead of being stored and reloaded between the passes.
    """
    lines = ["def ortho(M, rdiag):"]
    emit = lines.append
    for p in range(d):
        for j in range(k):
            emit(f"    m_{p}_{j} = M[{p}, {j}]")

    def sq(j):
        return " + ".join(f"m_{p}_{j} * m_{p}_{j}" for p in range(d))

    def sweep(j, indent):
        for i in range(j):
            emit(indent + "dot = " + " + ".join(f"m_{p}_{i} * m_{p}_{j}" for p in range(d)))
            for p in range(d):
                emit(indent + f"m_{p}_{j} -= dot * m_{p}_{i}")
        emit(indent + f"nrm = {sq(j)}")

    for j in range(k):
        emit(f"    nrm0 = {sq(j)}")
        if j == 0:
            emit("    nrm = nrm0")
        else:
            sweep(j, "    ")
            emit(f"    if not (nrm > {REORTH_FRACTION!r} * nrm0):")
            sweep(j, "        ")
        emit("    nrm = np.sqrt(nrm)")
        emit(f"    rdiag[{j}] = nrm")
        emit("    if nrm > 0.0:")
        emit("        inv = 1.0 / nrm")
        for p in range(d):
            emit(f"        m_{p}_{j} *= inv")
    for p in range(d):
        for j in range(k):
            emit(f"    M[{p}, {j}] = m_{p}_{j}")
    return "\n".join(lines) + "\n"


def qr_path(d: int, k: int) -> str:
    """The QR the engine uses for a (d, k) tangent block: ``"scalar"``, ``"mgs"`` or ``"lapack"``.

    ``"scalar"``: at most ``SCALAR_QR_MAX_SIZE`` entries, MGS in local scalars; ``"mgs"``: modified
    Gram-Schmidt (sizes as constants up to ``SMALL_DIM_MAX`` rows); ``"lapack"``: geqrf/orgqr,
    when d * k**2 > ``QR_MGS_MAX_WORK`` (measured crossover, see :mod:`rdsim._config`).
    """
    if d * k <= SCALAR_QR_MAX_SIZE:
        return "scalar"
    if d * k * k > QR_MGS_MAX_WORK:
        return "lapack"
    return "mgs"


@functools.lru_cache(maxsize=None)
def make_orthonormalize(d: int, k: int):
    """:func:`orthonormalize` specialised on the block size (d, k).

    The path is :func:`qr_path`. Blocks of at most ``SCALAR_QR_MAX_SIZE`` entries get generated
    straight-line code (the block in local scalars); other MGS blocks with at most
    ``SMALL_DIM_MAX`` rows get the loop version with the sizes as compile-time constants, larger
    ones the generic MGS kernel (all MGS variants give identical results); wide blocks LAPACK.
    """
    path = qr_path(d, k)
    if path == "lapack":
        return _qr_lapack
    if path == "scalar":
        namespace = {"np": np}
        exec(compile(_scalar_mgs_source(d, k), f"<rdsim orthonormalize {d}x{k}>", "exec"), namespace)
        return nb.njit(inline="always", **NUMBA_OPTIONS)(namespace["ortho"])
    if d > SMALL_DIM_MAX:
        return _orthonormalize_mgs
    mgs = _mgs_inline

    @nb.njit(**NUMBA_OPTIONS)
    def ortho(M, rdiag):
        mgs(M, rdiag, d, k)

    return ortho
