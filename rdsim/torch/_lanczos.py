"""Lanczos with full reorthogonalisation for the top eigenvalues of a symmetric operator (private).

Used by :class:`rdsim.torch.OptimizerMap` to record the sharpness lambda_max(H) along a run.
"""

from __future__ import annotations

import torch

__all__ = ["lanczos_top"]


def lanczos_top(matvec, dim: int, n_iter: int = 20, *, device=None, dtype=torch.float64,
                seed: int = 0) -> torch.Tensor:
    """Ritz values of a symmetric operator after ``n_iter`` Lanczos steps, descending (float64, CPU).

    Full reorthogonalisation (twice, classical Gram-Schmidt against all previous Lanczos vectors);
    the off-diagonal beta_j is the norm of the new vector after reorthogonalisation (MATH.md §6).
    The start vector is Rademacher from a seeded generator, so the result is deterministic. The
    iteration stops early at an invariant subspace (beta below 1e-12 of the largest |alpha|).

    Args:
        matvec: v (dim,) -> A v (dim,), in ``dtype`` on ``device``.
        dim: operator dimension.
        n_iter: Lanczos steps m (at most dim).
        device, dtype: of the vectors passed to ``matvec``; the recurrence itself runs in float64.
        seed: seed of the start vector.
    """
    m = max(1, min(int(n_iter), int(dim)))
    gen = torch.Generator().manual_seed(int(seed))
    v = (torch.randint(0, 2, (dim,), generator=gen).to(torch.float64) * 2 - 1).to(device)
    v = v / torch.linalg.vector_norm(v)
    basis = torch.zeros((m, dim), dtype=torch.float64, device=device)
    alphas, betas = [], []
    for j in range(m):
        basis[j] = v
        w = matvec(v.to(dtype)).to(torch.float64)
        alpha = torch.dot(w, v)
        alphas.append(alpha)
        w = w - alpha * v
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        B = basis[:j + 1]
        for _ in range(2):
            w = w - B.T @ (B @ w)
        beta = torch.linalg.vector_norm(w)
        if j == m - 1:
            break
        scale = max(abs(float(a)) for a in alphas)
        if float(beta) <= 1e-12 * max(scale, 1e-300):
            break
        betas.append(beta)
        v = w / beta
    n = len(alphas)
    T = torch.diag(torch.stack(alphas))
    if n > 1:
        off = torch.stack(betas[:n - 1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T.cpu()).flip(0)
