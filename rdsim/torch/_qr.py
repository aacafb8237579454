"""Thin QR of a block of tangent rows on the block's device (private).

The torch QR loop keeps the tangent block as k rows of length n (k << n) in the model's dtype,
the dtype in which the next tangent push consumes it. Two factorisations of a pushed block V:

* Cholesky QR (the default): G = V V^T in float64, L = chol(G), Q = L^{-1} V. Three passes over
  the block for a float32 model (cast to float64, Gram, apply) and two for float64, all GEMM-shaped,
  against a Householder factorisation's panel sweeps. log|R_ii| = log L_ii. Q is orthonormal to
  about kappa(V)^2 u (u = 2^-53); a rigorous cheap bound kappa(V)^2 <= trace(G) ||L^{-1}||_F^2
  is checked on every factorisation and a block whose bound exceeds :data:`CHOLQR_KAPPA2_MAX`
  (or whose Cholesky factorisation fails) is flagged, so that the caller redoes the step with
* Householder (``torch.linalg.qr`` in float64), unconditionally stable.

For the loop's blocks (V = Df Q with Q orthonormal, one step at qr_every = 1) kappa(V) is the
spread of the one-step stretch factors, typically below 10, so Cholesky QR is as accurate as
Householder (|R_ii| agree to ~1e-15 relative) and its orthogonality defect ~1e-14.
"""

from __future__ import annotations

import torch

#: the largest accepted bound on kappa(V)^2 (orthogonality defect ~ kappa^2 u <= 1e-10)
CHOLQR_KAPPA2_MAX = 1e-10 / 2.0 ** -53


def householder_rows(V: torch.Tensor, out_dtype: torch.dtype):
    """(Q in ``out_dtype``, log|diag R| in float64) for V = R^T Q, Q with orthonormal rows; V is (k, n)."""
    q, r = torch.linalg.qr(V.to(torch.float64).mT)
    return q.mT.to(out_dtype), torch.log(r.diagonal().abs())


def cholqr_rows(V: torch.Tensor):
    """(Q, log diag R, ok) by Cholesky QR on the rows of V (k, n); Q in V's dtype, logs in float64.

    ``ok`` is a 0-d bool tensor, False when the Cholesky factorisation failed or the bound on
    kappa(V)^2 exceeds :data:`CHOLQR_KAPPA2_MAX`. Nothing here waits for the device.
    """
    k = V.shape[0]
    V64 = V.to(torch.float64)
    G = V64 @ V64.mT
    L, info = torch.linalg.cholesky_ex(G)
    Li = torch.linalg.solve_triangular(L, torch.eye(k, dtype=torch.float64, device=V.device), upper=False)
    Q = Li.to(V.dtype) @ V if V.dtype != torch.float64 else Li @ V64
    kappa2 = G.diagonal().sum() * Li.square().sum()
    ok = (info == 0) & (kappa2 <= CHOLQR_KAPPA2_MAX)
    return Q, torch.log(L.diagonal()), ok
