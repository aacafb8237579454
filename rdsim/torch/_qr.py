"""Thin QR of a block of tangent rows on the block's device (private).

The torch QR loop keeps the tangent block as k rows of length n (k << n) in the model's dtype,
the dtype in which the next tangent push consumes it. Two factorisations of a pushed block V:

* Cholesky QR (the default): G = V V^T in the block's dtype, L = chol(G) in float64,
  Q = L^{-1} V. Two GEMM-shaped passes over the block (Gram, apply), against a Householder
  factorisation's panel sweeps. log|R_ii| = log L_ii. Q is orthonormal to about kappa(V)^2 u
  (u the unit roundoff of the Gram's dtype); a rigorous cheap bound
  kappa(V)^2 <= trace(G) ||L^{-1}||_F^2 is checked on every factorisation and a block whose
  bound exceeds :data:`CHOLQR_KAPPA2_MAX` (float64) or :data:`CHOLQR_KAPPA2_MAX_F32` (or whose
  Cholesky factorisation fails) is flagged, so that the caller redoes the step with
* Householder (``torch.linalg.qr`` in float64), unconditionally stable.

For the loop's blocks (V = Df Q with Q orthonormal, one step at qr_every = 1) kappa(V) is the
spread of the one-step stretch factors, typically below 10, so Cholesky QR is as accurate as
Householder (|R_ii| agree to ~1e-15 relative in float64) and its orthogonality defect ~1e-14.

Why a float32 block gets a float32 Gram (measured 2-3x cheaper than casting the block to float64
for the Gram on the 2-core VM, 26k x 16 and 26k x 32 blocks): whatever lower-triangular L the
factorisation returns, Q = L^{-1} V holds to the rounding of that product, so over a run the
factors telescope, Q_0 A_1 ... A_T = (L_1 ... L_T) Q_T (A_t the step's tangent map in rows), and
the summed log L_ii differ from the exact QR's by log chol(Q_T Q_T^T)_ii only: the last block's
orthogonality defect (<= kappa^2 u / T in the exponents), not a sum of per-step errors. Measured
on the benchmark MLP (float32, SGD, k = 16, 200 steps): the exponents differ from those of the
float64 model by 3.7e-9 (of ~1.4e-4) with the float32 Gram and by 3.6e-9 with the float64 Gram:
the float32 push's own rounding, not the Gram's.
"""

from __future__ import annotations

import torch

#: the largest accepted bound on kappa(V)^2 for a float64 Gram (orthogonality defect ~ kappa^2 u <= 1e-10)
CHOLQR_KAPPA2_MAX = 1e-10 / 2.0 ** -53
#: the same for a float32 Gram (defect <= 1e-2: Q stays well conditioned, and the next
#: factorisation corrects its normalisation; see the module docstring)
CHOLQR_KAPPA2_MAX_F32 = 1e-2 / 2.0 ** -24


def householder_rows(V: torch.Tensor, out_dtype: torch.dtype):
    """(Q in ``out_dtype``, log|diag R| in float64) for V = R^T Q, Q with orthonormal rows; V is (k, n)."""
    q, r = torch.linalg.qr(V.to(torch.float64).mT)
    return q.mT.to(out_dtype), torch.log(r.diagonal().abs())


def cholqr_rows(V: torch.Tensor):
    """(Q, log diag R, ok) by Cholesky QR on the rows of V (k, n); Q in V's dtype, logs in float64.

    The Gram matrix is formed in V's dtype for float32 blocks (see the module docstring) and in
    float64 otherwise; the Cholesky factor and the logs are float64. ``ok`` is a 0-d bool tensor,
    False when the Cholesky factorisation failed or the bound on kappa(V)^2 exceeds
    :data:`CHOLQR_KAPPA2_MAX` (:data:`CHOLQR_KAPPA2_MAX_F32` for a float32 Gram). Nothing here
    waits for the device.
    """
    k, dtype = V.shape[0], V.dtype
    if dtype == torch.float32:
        G, kappa2_max = (V @ V.mT).to(torch.float64), CHOLQR_KAPPA2_MAX_F32
    else:
        V = V.to(torch.float64)
        G, kappa2_max = V @ V.mT, CHOLQR_KAPPA2_MAX
    L, info = torch.linalg.cholesky_ex(G)
    Li = torch.linalg.solve_triangular(L, torch.eye(k, dtype=torch.float64, device=V.device), upper=False)
    Q = (Li.to(V.dtype) @ V).to(dtype)
    kappa2 = G.diagonal().sum() * Li.square().sum()
    ok = (info == 0) & (kappa2 <= kappa2_max)
    return Q, torch.log(L.diagonal()), ok
