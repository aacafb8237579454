"""Seeded parameter initialisation shared by the networks (private).

Every network draws its initial parameters from its own ``torch.Generator`` on the CPU in float64
and then casts them to the requested dtype and device, so one seed gives the same weights (up to
rounding) in float32 and float64, on the CPU and on CUDA, and the global torch RNG is never touched.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    return int(seed)


def generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(check_seed(seed))
    return g


def factory(dtype, device) -> dict:
    """Keyword arguments for parameter construction (dtype None: torch's default dtype)."""
    return {"dtype": torch.get_default_dtype() if dtype is None else dtype, "device": device}


@torch.no_grad()
def fill_uniform_(param: torch.Tensor, bound: float, g: torch.Generator) -> None:
    """param <- U(-bound, bound), drawn in float64 on the CPU from ``g``."""
    draw = torch.empty(param.shape, dtype=torch.float64).uniform_(-bound, bound, generator=g)
    param.copy_(draw.to(dtype=param.dtype, device=param.device))


@torch.no_grad()
def fill_normal_(param: torch.Tensor, std: float, g: torch.Generator) -> None:
    """param <- N(0, std^2), drawn in float64 on the CPU from ``g``."""
    draw = torch.empty(param.shape, dtype=torch.float64).normal_(0.0, std, generator=g)
    param.copy_(draw.to(dtype=param.dtype, device=param.device))


def linear(in_features: int, out_features: int, bias: bool, kw: dict) -> nn.Linear:
    """An nn.Linear whose construction draws nothing from the global RNG (torch's
    ``skip_init``); initialise it with :func:`init_linear_`."""
    kw = {**kw, "device": "cpu" if kw.get("device") is None else kw["device"]}
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, **kw)


def init_linear_(layer: nn.Linear, g: torch.Generator) -> None:
    """torch's default nn.Linear distribution, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and
    bias (kaiming_uniform with a = sqrt(5)), but drawn from ``g``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    fill_uniform_(layer.weight, bound, g)
    if layer.bias is not None:
        fill_uniform_(layer.bias, bound, g)
