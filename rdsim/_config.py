"""Numerical flags and tuning constants for rdsim, in one place.

Every numba kernel in rdsim is compiled with :data:`NUMBA_OPTIONS`: ``fastmath`` stays off (it
reorders the long sums that Lyapunov accuracy depends on), the on-disk cache stays off (stale
caches of user closures are a classic source of wrong results), and ``error_model="numpy"`` makes a
division by zero produce inf/nan (reported as a diverged run) instead of raising deep in a loop.
"""

from __future__ import annotations

NUMBA_OPTIONS: dict = {"fastmath": False, "cache": False, "error_model": "numpy"}

#: Largest dimension for which the engine uses its own allocation-free kernels (matrix products,
#: modified Gram-Schmidt with re-orthogonalisation). Above it, BLAS/LAPACK are called instead.
SMALL_DIM_MAX: int = 48

#: Largest dimension for which the QR uses rdsim's own modified Gram-Schmidt (allocation-free,
#: orthogonal to machine precision); LAPACK's geqrf/orgqr above it. Measured on the 2-core CI
#: machines, MGS beat LAPACK (OpenBLAS) at every size up to (1000, 16).
QR_MGS_MAX_DIM: int = 512

#: Noise is always drawn from the user's ``noise(rng, n)`` in chunks of exactly this many steps, so
#: the sequence xi_0, xi_1, ... depends only on the seed, never on how a run is segmented.
NOISE_CHUNK: int = 1024

#: Number of steps the numba engine runs between returns to Python (progress bar updates).
SEGMENT_STEPS: int = 1 << 15
