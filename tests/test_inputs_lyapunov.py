"""Bad inputs to lyapunov_spectrum, kaplan_yorke_dimension, sharpness_dimension(lambdas),
rds_sharpness and user functions failing inside the loop: the exception type and the argument named."""

import numpy as np
import pytest

import rdsim
from rdsim._validate import UserFunctionError

H = rdsim.systems.henon()


def ly(*args, **kw):
    return rdsim.lyapunov_spectrum(H, *(args or ([0.1, 0.1], 10)), **kw)


CASES = [
    ("seed -1", lambda: ly(seed=-1), ValueError, "seed"),
    ("seed str", lambda: ly(seed="abc"), TypeError, "seed"),
    ("seed float", lambda: ly(seed=1.5), TypeError, "seed"),
    ("x0 shape", lambda: ly([0.1, 0.1, 0.3], 10), ValueError, "x0"),
    ("x0 nan", lambda: ly([np.nan, 0.1], 10), ValueError, "x0"),
    ("x0 str", lambda: ly("ab", 10), TypeError, "x0"),
    ("n_steps float", lambda: ly([0.1, 0.1], 10.0), TypeError, "n_steps"),
    ("n_steps 0", lambda: ly([0.1, 0.1], 0), ValueError, "n_steps"),
    ("k 0", lambda: ly(k=0), ValueError, "k"),
    ("k > dim", lambda: ly(k=3), ValueError, "k"),
    ("qr_every 0", lambda: ly(qr_every=0), ValueError, "qr_every"),
    ("transient -1", lambda: ly(transient=-1), ValueError, "transient"),
    ("n_blocks 1", lambda: ly(n_blocks=1), ValueError, "n_blocks"),
    ("record_every 0", lambda: ly(record_every=0), ValueError, "record_every"),
    ("progress str", lambda: ly(progress="yes"), TypeError, "progress"),
    ("Q0 nan", lambda: ly(Q0=np.full((2, 2), np.nan)), ValueError, "Q0"),
    ("Q0 shape", lambda: ly(Q0=np.eye(3)), ValueError, "Q0"),
    ("Q0 rank", lambda: ly(Q0=np.ones((2, 2))), ValueError, "Q0"),
    ("system", lambda: rdsim.lyapunov_spectrum(lambda x: x, [0.1], 10), TypeError, "system"),
    ("resume type", lambda: ly(None, 10, resume=3), TypeError, "resume"),
    ("KY nan", lambda: rdsim.kaplan_yorke_dimension([np.nan, -1.0]), ValueError, "exponents"),
    ("KY empty", lambda: rdsim.kaplan_yorke_dimension([]), ValueError, "exponents"),
    ("KY str", lambda: rdsim.kaplan_yorke_dimension("ab"), TypeError, "exponents"),
    ("SD lambdas nan", lambda: rdsim.sharpness_dimension([np.nan, 0.5]), ValueError, "lambdas"),
    ("rds points", lambda: rdsim.rds_sharpness(H, np.zeros((3, 5))), ValueError, "points"),
    ("rds n_noise", lambda: rdsim.rds_sharpness(H, np.zeros((3, 2)), n_noise=0), ValueError, "n_noise"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_named(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value), str(info.value)


def test_user_step_failing_inside_the_compiled_loop():
    """A numba step that raises after some steps: UserFunctionError naming step/jacobian, chained."""
    def step(x, p, xi):
        if x[0] > 1e3:
            raise ValueError("state too large for this model")
        return np.array([2.0 * x[0]])

    def jac(x, p, xi):
        return np.array([[2.0]])

    m = rdsim.Map(step, jac, 1)
    with pytest.raises(UserFunctionError) as info:
        rdsim.lyapunov_spectrum(m, [1.0], 100)
    assert "step/jacobian" in str(info.value) and "state too large" in str(info.value)
    assert info.value.__cause__ is not None


def test_user_noise_failing():
    class Bad(Exception):
        pass

    def step(x, p, xi):
        return np.array([0.5 * x[0] + xi[0]])

    def jac(x, p, xi):
        return np.array([[0.5]])

    def noise(rng, n):
        if n >= 1000:  # the loop draws its noise in chunks of 1024; the construction probe less
            raise Bad("no noise today")
        return rng.standard_normal((n, 1))

    m = rdsim.Map(step, jac, 1, noise=noise)
    with pytest.raises(UserFunctionError, match="noise") as info:
        rdsim.lyapunov_spectrum(m, [0.0], 10)
    assert isinstance(info.value.__cause__, Bad)


def test_map_refuses_bad_user_functions_at_construction():
    """A step numba cannot compile, one returning a non-array, one raising on the probe point."""
    import collections

    def jac(x, p, xi):
        return np.eye(1)

    def uncompilable(x, p, xi):
        return np.array([collections.Counter([1])[1] * x[0]])

    def returns_dict(x, p, xi):
        return {"a": x}

    def raises(x, p, xi):
        raise ValueError("no such state")

    with pytest.raises(TypeError, match="step: numba cannot compile"):
        rdsim.Map(uncompilable, jac, 1)
    with pytest.raises(TypeError, match="step: must return a numpy array or a tuple"):
        rdsim.Map(returns_dict, jac, 1)
    with pytest.raises(UserFunctionError, match="step.*probe call") as info:
        rdsim.Map(raises, jac, 1)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(TypeError, match="jacobian: must return"):
        rdsim.Map(lambda x, p, xi: x.copy(), lambda x, p, xi: {"J": x}, 1)
