"""The three styles of a user ``rdsim.Map`` (returning arrays, in place, returning tuples) and
their mixtures give bitwise identical runs; the tuple style is validated at construction.
"""

import sys

import numpy as np
import pytest

import rdsim

A, B = 1.4, 0.3
X0 = [0.1, 0.1]


# ---- Hénon in the three styles -----------------------------------------------------------------

def step_array(x, p, xi):
    return np.array([1.0 - p[0] * x[0] * x[0] + x[1], p[1] * x[0]])


def jac_array(x, p, xi):
    return np.array([[-2.0 * p[0] * x[0], 1.0], [p[1], 0.0]])


def step_inplace(x, p, xi, out):
    out[0] = 1.0 - p[0] * x[0] * x[0] + x[1]
    out[1] = p[1] * x[0]


def jac_inplace(x, p, xi, out):
    out[0, 0] = -2.0 * p[0] * x[0]
    out[0, 1] = 1.0
    out[1, 0] = p[1]


def step_tuple(x, p, xi):
    return (1.0 - p[0] * x[0] * x[0] + x[1], p[1] * x[0])


def jac_tuple(x, p, xi):
    return ((-2.0 * p[0] * x[0], 1.0), (p[1], 0.0))


def jac_tuple_mixed_types(x, p, xi):
    # integer entries make numba type the rows as heterogeneous tuples: still accepted
    return ((-2.0 * p[0] * x[0], 1), (p[1], 0))


STYLES = {
    "array": (step_array, jac_array),
    "inplace": (step_inplace, jac_inplace),
    "tuple": (step_tuple, jac_tuple),
    "tuple step, in-place jacobian": (step_tuple, jac_inplace),
    "in-place step, tuple jacobian": (step_inplace, jac_tuple),
    "array step, tuple jacobian (int entries)": (step_array, jac_tuple_mixed_types),
    "tuple step, array jacobian": (step_tuple, jac_array),
}


@pytest.fixture(scope="module")
def henon_runs():
    out = {}
    for label, (s, j) in STYLES.items():
        m = rdsim.Map(s, j, 2, params=(A, B), name=label)
        out[label] = (m, rdsim.lyapunov_spectrum(m, X0, 20_000, transient=100))
    return out


def test_styles_detected(henon_runs):
    assert (henon_runs["tuple"][0]._step_style, henon_runs["tuple"][0]._jac_style) == ("tuple", "tuple")
    assert henon_runs["array"][0]._step_style == "returning"
    assert henon_runs["inplace"][0]._jac_style == "in place"
    assert henon_runs["tuple step, in-place jacobian"][0]._jac_style == "in place"


@pytest.mark.parametrize("label", [k for k in STYLES if k != "array"])
def test_styles_bitwise_identical(henon_runs, label):
    ref = henon_runs["array"][1]
    res = henon_runs[label][1]
    assert res.status == "ok"
    assert np.array_equal(res.exponents, ref.exponents)
    assert np.array_equal(res.x_final, ref.x_final)
    assert np.array_equal(res.Q_final, ref.Q_final)


def test_tuple_style_matches_published_henon(henon_runs):
    res = henon_runs["tuple"][1]
    # published (0.42, -1.62); the sum is ln b exactly up to rounding
    np.testing.assert_allclose(res.exponents, [0.42, -1.62], atol=5e-3)
    assert abs(res.exponents.sum() - np.log(B)) < 1e-10


def test_tuple_style_step_tangent_jacobian_methods(henon_runs):
    m_t, m_a = henon_runs["tuple"][0], henon_runs["array"][0]
    x = np.array([0.3, -0.2])
    V = np.array([[1.0, 2.0, 0.5], [-1.0, 0.25, 3.0]])
    assert np.array_equal(m_t.step(x), m_a.step(x))
    assert np.array_equal(m_t.tangent(x, None, V), m_a.tangent(x, None, V))
    J = m_t.jacobian(x)
    assert J.dtype == np.float64 and np.array_equal(J, m_a.jacobian(x))


# ---- a noisy map in tuple style ------------------------------------------------------------------

def _noise(rng, n):
    return rng.standard_normal((n, 2))


def noisy_step_array(x, p, xi):
    return np.array([p[0] * np.sin(x[0]) + 0.5 * np.tanh(x[1]) + p[1] * xi[0],
                     0.9 * np.cos(x[0]) - 0.3 * x[1] + p[1] * xi[1]])


def noisy_jac_array(x, p, xi):
    return np.array([[p[0] * np.cos(x[0]), 0.5 * (1.0 - np.tanh(x[1]) ** 2)], [-0.9 * np.sin(x[0]), -0.3]])


def noisy_step_tuple(x, p, xi):
    return (p[0] * np.sin(x[0]) + 0.5 * np.tanh(x[1]) + p[1] * xi[0],
            0.9 * np.cos(x[0]) - 0.3 * x[1] + p[1] * xi[1])


def noisy_jac_tuple(x, p, xi):
    return ((p[0] * np.cos(x[0]), 0.5 * (1.0 - np.tanh(x[1]) ** 2)), (-0.9 * np.sin(x[0]), -0.3))


def test_noisy_map_tuple_style_bitwise_equal_array_style():
    p = (1.2, 0.3)
    m_a = rdsim.Map(noisy_step_array, noisy_jac_array, 2, params=p, noise=_noise)
    m_t = rdsim.Map(noisy_step_tuple, noisy_jac_tuple, 2, params=p, noise=_noise)
    r_a = rdsim.lyapunov_spectrum(m_a, X0, 5000, transient=100, seed=3)
    r_t = rdsim.lyapunov_spectrum(m_t, X0, 5000, transient=100, seed=3)
    assert r_a.status == r_t.status == "ok"
    assert np.all(np.isfinite(r_t.exponents))
    assert np.array_equal(r_a.exponents, r_t.exponents)
    assert np.array_equal(r_a.x_final, r_t.x_final)


def test_tuple_style_dim_one():
    m = rdsim.Map(lambda x, p, xi: (4.0 * x[0] * (1.0 - x[0]),), lambda x, p, xi: ((4.0 - 8.0 * x[0],),), 1)
    r = rdsim.lyapunov_spectrum(m, [0.2], 20_000, transient=100)
    assert abs(r.exponents[0] - np.log(2.0)) < 0.02  # the logistic map at r = 4: ln 2


# ---- validation ------------------------------------------------------------------------------------

def _bad_step_short(x, p, xi):
    return (x[0] + x[1],)


def _bad_step_long(x, p, xi):
    return (x[0], x[1], 0.0)


def _bad_jac_rows(x, p, xi):
    return ((1.0, 0.0),)


def _bad_jac_row_len(x, p, xi):
    return ((1.0, 0.0), (0.0,))


def _bad_jac_flat(x, p, xi):
    return (1.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("step, match", [(_bad_step_short, "length 1"), (_bad_step_long, "length 3")])
def test_wrong_length_tuple_step(step, match):
    with pytest.raises(ValueError, match=r"step: the tuple form must return a tuple of 2 floats.*" + match):
        rdsim.Map(step, jac_tuple, 2, params=(A, B))


@pytest.mark.parametrize("jac, match", [(_bad_jac_rows, "1 rows"), (_bad_jac_row_len, "row 1 has length 1"),
                                        (_bad_jac_flat, "flat tuple of length 4")])
def test_wrong_shape_tuple_jacobian(jac, match):
    with pytest.raises(ValueError, match=r"jacobian: the tuple form must return a tuple of 2 rows, each a tuple "
                                         r"of 2 floats \(2 x 2\).*" + match):
        rdsim.Map(step_tuple, jac, 2, params=(A, B))


# --- a map built again compiles nothing (rdsim._systems._jit_user's cache) ---------------------

def _henon_factory(scale=1.0):
    def step(x, p, xi, out):
        out[0] = 1.0 - p[0] * x[0] ** 2 + x[1] * scale
        out[1] = p[1] * x[0]

    def jac(x, p, xi, out):
        out[0, 0] = -2.0 * p[0] * x[0]
        out[0, 1] = scale
        out[1, 0] = p[1]

    return step, jac


HENON_GLOBAL_A = 1.4
HENON_GLOBAL_ARRAY = np.array([1.4])


def _henon_global(x, p, xi):
    return np.array([1.0 - HENON_GLOBAL_A * x[0] ** 2 + x[1], 0.3 * x[0]])


def _henon_global_jac(x, p, xi):
    return np.array([[-2.0 * HENON_GLOBAL_A * x[0], 1.0], [0.3, 0.0]])


def _henon_array(x, p, xi):
    return np.array([1.0 - HENON_GLOBAL_ARRAY[0] * x[0] ** 2 + x[1], 0.3 * x[0]])


def test_rebuilt_map_reuses_its_compiled_functions_and_kernel():
    """A map defined in a factory and built again with other params (a parameter scan) gets the
    same dispatchers and engine kernel back, with the results of a fresh build."""
    from rdsim import _systems

    maps = [rdsim.Map(*_henon_factory(), 2, params=(a, 0.3)) for a in (1.4, 1.2)]
    assert maps[0]._step_fn is maps[1]._step_fn and maps[0]._jac_fn is maps[1]._jac_fn
    assert maps[0]._advance is maps[1]._advance
    res = [rdsim.lyapunov_spectrum(m, [0.1, 0.1], 5_000, transient=100) for m in maps]
    assert abs(res[0].exponents[0] - 0.419) < 0.02 and abs(res[0].exponents.sum() - np.log(0.3)) < 1e-10
    # the same map built without the cache (a fresh njit) gives identical numbers
    _systems._JITTED.clear()
    fresh = rdsim.Map(*_henon_factory(), 2, params=(1.2, 0.3))
    assert fresh._step_fn is not maps[1]._step_fn
    np.testing.assert_array_equal(rdsim.lyapunov_spectrum(fresh, [0.1, 0.1], 5_000, transient=100).exponents,
                                  res[1].exponents)
    # a different captured value is a different function
    other = rdsim.Map(*_henon_factory(scale=0.5), 2, params=(1.2, 0.3))
    assert other._step_fn is not fresh._step_fn


def test_rebuilt_map_sees_changed_globals(monkeypatch):
    """numba freezes globals at compile time: a changed global scalar gives a new compilation,
    and a function reading a global array is never shared between maps."""
    from rdsim import _systems

    first = rdsim.lyapunov_spectrum(rdsim.Map(_henon_global, _henon_global_jac, 2), [0.1, 0.1], 5_000, transient=100)
    monkeypatch.setattr(sys.modules[__name__], "HENON_GLOBAL_A", 1.2)
    second = rdsim.lyapunov_spectrum(rdsim.Map(_henon_global, _henon_global_jac, 2), [0.1, 0.1], 5_000,
                                     transient=100)
    reference = rdsim.lyapunov_spectrum(rdsim.Map(*_henon_factory(), 2, params=(1.2, 0.3)), [0.1, 0.1], 5_000,
                                        transient=100)
    assert abs(first.exponents[0] - second.exponents[0]) > 0.05
    np.testing.assert_allclose(second.exponents, reference.exponents, rtol=0, atol=1e-12)
    assert _systems._jit_key(_henon_array) is None
    assert _systems._jit_user(_henon_array, "step") is not _systems._jit_user(_henon_array, "step")
