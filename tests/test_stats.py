"""rdsim.stats: Kendall tau-b (vs scipy) and the granulated Kendall coefficient (hand-worked grids)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from rdsim.stats import granulated_kendall, kendall_tau


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = [2, 3, 7, 20, 55, 130][seed]
    x = rng.integers(0, 4, n).astype(float)  # many ties
    y = rng.integers(0, 5, n) + 0.5 * rng.integers(0, 2, n)
    ref = sps.kendalltau(x, y, variant="b").statistic
    assert kendall_tau(x, y) == pytest.approx(ref, abs=1e-14) or (math.isnan(ref) and math.isnan(kendall_tau(x, y)))
    xc, yc = rng.standard_normal(n), rng.standard_normal(n)
    assert kendall_tau(xc, yc) == pytest.approx(sps.kendalltau(xc, yc).statistic, abs=1e-14)


def test_kendall_tau_hand_values_and_edge_cases():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    # x = (1, 1, 2), y = (1, 2, 3): C = 2, D = 0, tied-in-x pairs 1: 2 / sqrt(2 * 3)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))  # constant x
    assert math.isnan(kendall_tau([1], [2]))
    assert math.isnan(kendall_tau([1, np.nan, 3], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        kendall_tau([1, 2], [1, 2, 3])


def test_kendall_tau_long_input_blocks():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 50, 3000)
    y = x + rng.integers(0, 30, 3000)
    assert kendall_tau(x, y) == pytest.approx(sps.kendalltau(x, y).statistic, abs=1e-12)


def _grid(measure, target, lrs=(0.1, 0.2, 0.4), bss=(8, 32)):
    rows = []
    for i, lr in enumerate(lrs):
        for j, bs in enumerate(bss):
            rows.append({"lr": lr, "batch_size": bs, "m": measure[i][j], "g": target[i][j]})
    return rows


def test_granulated_kendall_hand_worked_3x2():
    # target g[lr][bs]; the measure ranks lr right at bs=8, wrong at bs=32; ranks bs right everywhere
    g = [[1, 2], [3, 4], [5, 6]]
    m = [[10, 20], [30, 19], [50, 18]]
    r = granulated_kendall(_grid(m, g), "m", "g")
    # psi_lr: tau over lr at bs=8 is +1, at bs=32 is -1  -> 0
    # psi_bs: at each lr the pair (bs=8, bs=32): lr=0.1 +1, lr=0.2 -1 (30 > 19 but 3 < 4), lr=0.4 -1 -> -1/3
    assert r["lr"] == pytest.approx(0.0)
    assert r["batch_size"] == pytest.approx(-1 / 3)
    assert r["mean"] == pytest.approx(-1 / 6)
    # overall tau over the 6 points (measure 10, 20, 30, 19, 50, 18 against target 1..6):
    # 9 concordant, 6 discordant pairs of 15 -> 3/15
    assert r["tau"] == pytest.approx(3 / 15)
    assert r["n"] == 6 and r["groups"] == {"lr": 2, "batch_size": 3}


def test_granulated_kendall_perfect_and_reversed():
    g = [[1, 2], [3, 4]]
    r = granulated_kendall(_grid(g, g, lrs=(0.1, 0.2)), "m", "g")
    assert (r["lr"], r["batch_size"], r["mean"], r["tau"]) == (1.0, 1.0, 1.0, 1.0)
    neg = [[-1, -2], [-3, -4]]
    r = granulated_kendall(_grid(neg, g, lrs=(0.1, 0.2)), "m", "g")
    assert (r["lr"], r["batch_size"], r["mean"], r["tau"]) == (-1.0, -1.0, -1.0, -1.0)


def test_granulated_kendall_seeds_are_other_hyperparameters():
    # two seeds: along lr, seed 0 is right (+1) and seed 1 wrong (-1) at the single batch size
    rows = [dict(lr=0.1, batch_size=8, seed=0, m=1.0, g=1.0), dict(lr=0.2, batch_size=8, seed=0, m=2.0, g=2.0),
            dict(lr=0.1, batch_size=8, seed=1, m=2.0, g=1.0), dict(lr=0.2, batch_size=8, seed=1, m=1.0, g=2.0)]
    r = granulated_kendall(rows, "m", "g")
    assert r["lr"] == 0.0 and r["groups"]["lr"] == 2
    assert math.isnan(r["batch_size"]) and r["groups"]["batch_size"] == 0  # one batch size: no psi_bs
    assert r["mean"] == 0.0  # the mean of the defined psi


def test_granulated_kendall_drops_missing_rows_and_accepts_columns():
    rows = [dict(lr=0.1, batch_size="full", m=1.0, g=1.0), dict(lr=0.2, batch_size="full", m=None, g=2.0),
            dict(lr=0.3, batch_size="full", m=3.0, g=float("nan")), dict(lr=0.4, batch_size="full", m=4.0, g=4.0),
            dict(lr=0.5, batch_size="full", m="", g=5.0)]
    r = granulated_kendall(rows, "m", "g")
    assert r["n"] == 2 and r["lr"] == 1.0
    cols = {k: [row[k] for row in rows] for k in rows[0]}
    assert granulated_kendall(cols, "m", "g")["lr"] == 1.0
    with pytest.raises(ValueError, match="nope"):
        granulated_kendall(rows, "nope", "g")
    with pytest.raises(TypeError):
        granulated_kendall(42, "m", "g")
