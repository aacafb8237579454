"""Numerical flags and tuning constants for rdsim, in one place.

Every numba kernel in rdsim is compiled with :data:`NUMBA_OPTIONS`: ``fastmath`` stays off (it
reorders the long sums that Lyapunov accuracy depends on), the on-disk cache stays off (stale
caches of user closures are a classic source of wrong results), and ``error_model="numpy"`` makes a
division by zero produce inf/nan (reported as a diverged run) instead of raising deep in a loop.
"""

from __future__ import annotations

NUMBA_OPTIONS: dict = {"fastmath": False, "cache": False, "error_model": "numpy"}

#: Largest dimension for which the engine's matrix products (a Map's tangent push J @ V, the
#: flows' stages) are its own allocation-free loops, and its MGS QR kernels are compiled with the
#: sizes as constants. Above it, products are BLAS dgemm (which QR: see QR_MGS_MAX_WORK).
SMALL_DIM_MAX: int = 48

#: The QR of a (d, k) tangent block uses rdsim's own modified Gram-Schmidt (allocation-free,
#: orthogonal to machine precision) when d * k**2 <= QR_MGS_MAX_WORK, LAPACK's geqrf/orgqr
#: otherwise (:func:`rdsim._linalg.qr_path`). MGS wins for thin blocks (no allocation or call
#: overhead: 2-3x faster at k = 1); LAPACK for wide ones (blocked, cache friendly: 21x faster at
#: d = k = 500). Measured (single-threaded OpenBLAS, 2-core x86-64) on d in {8, ..., 1000},
#: k in {1, 4, 8, 12, 16, 32, 64, d}: at every d the crossover lies between d * k**2 = 8e3 and 3.2e4
#: (e.g. (64, 16), (128, 8-12), (256, 8), (1000, 4)); see benchmarks/bench_engine.py.
QR_MGS_MAX_WORK: int = 16_000

#: Noise is always drawn from the user's ``noise(rng, n)`` in chunks of exactly this many steps, so
#: the sequence xi_0, xi_1, ... depends only on the seed, never on how a run is segmented.
NOISE_CHUNK: int = 1024

#: Number of steps the numba engine runs between returns to Python (progress bar updates).
SEGMENT_STEPS: int = 1 << 15
