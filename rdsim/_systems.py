"""The random-dynamical-system abstraction and the numba systems ``Map`` and ``Flow``.

Every system in rdsim is a (random) map x_{t+1} = f(x_t, xi_t) (MATH.md §1) that knows

* its dimension ``dim`` and the length ``noise_dim`` of one noise vector xi_t (0: deterministic),
* the time one step takes, ``dt`` (1 for maps; exponents are reported per unit time),
* how to draw the noise of n consecutive steps from a seeded ``numpy.random.Generator``,
* one step ``step(x, xi)`` and the push of a tangent block ``tangent(x, xi, V) = Df(x, xi) @ V``.

Numba systems additionally carry a jitted ``advance`` kernel that does both at once without
allocating; the QR engine (:mod:`rdsim._engine`) runs entirely inside numba on that kernel.
"""

from __future__ import annotations

import abc
import functools
import types
from typing import Any, Callable

import numba as nb
import numpy as np

from ._config import NOISE_CHUNK, NUMBA_OPTIONS, SMALL_DIM_MAX
from ._linalg import matmul_into
from ._validate import UserFunctionError

__all__ = ["AbstractSystem", "AbstractNumbaSystem", "Map", "Flow", "NoiseStream"]


class AbstractSystem(abc.ABC):
    """Interface of every random dynamical system (numba or torch backed).

    Attributes:
        dim: state dimension d.
        noise_dim: length of one noise vector xi_t (0 for deterministic systems).
        dt: time per step (1.0 for maps, the integration step for flows).
        name: a short label.
        backend: ``"numba"`` or ``"torch"``.
    """

    dim: int
    noise_dim: int
    dt: float
    name: str
    backend: str

    @abc.abstractmethod
    def step(self, x, xi):
        """Return f(x, xi), the next state."""

    @abc.abstractmethod
    def tangent(self, x, xi, V):
        """Return Df(x, xi) @ V for a (dim, k) block of tangent vectors V."""

    def jacobian(self, x, xi):
        """Dense one-step Jacobian Df(x, xi), shape (dim, dim)."""
        return self.tangent(x, xi, np.eye(self.dim))

    @property
    def tangent_dim(self) -> int:
        """Dimension of the tangent space the spectrum lives in (``dim`` unless a system says otherwise)."""
        return self.dim

    @abc.abstractmethod
    def sample_noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The noise of n consecutive steps, shape (n, noise_dim), float64."""

    def noise_sampler(self, rng: np.random.Generator):
        """A callable ``sampler(n)`` returning the next n noise vectors of one run.

        The default draws ``sample_noise(rng, n)``; systems whose noise has memory (epoch-wise
        minibatches, a step counter) return a stateful sampler. rdsim always calls it with fixed
        chunk sizes, so the sequence depends only on the generator's seed.
        """
        return lambda n: self.sample_noise(rng, n)

    def initial_state(self, x0) -> np.ndarray:
        """Validate x0 and return the full initial state as a fresh float64 array (dim,)."""
        if x0 is None:
            x0 = getattr(self, "x0", None)
            if x0 is None:
                raise ValueError(f"x0: {self.name} has no default initial state; pass x0 of shape ({self.dim},)")
        try:
            x = np.array(x0, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"x0: expected an array of {self.dim} real numbers, got {type(x0).__name__}") from err
        if x.ndim == 0 and self.dim == 1:
            x = x.reshape(1)
        if x.shape != (self.dim,):
            raise ValueError(f"x0: expected shape ({self.dim},) for {self.name}, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"x0: must be finite, got {x}")
        return np.ascontiguousarray(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, noise_dim={self.noise_dim}, dt={self.dt})"


class AbstractNumbaSystem(AbstractSystem):
    """A system whose step and tangent are numba kernels; the engine runs it without Python.

    Concrete subclasses set ``_advance`` (see :mod:`rdsim._engine`), ``_kernel_params``,
    ``_n_work`` and ``_n_wv`` (scratch sizes), ``dim``, ``noise_dim``, ``dt`` and ``name``.
    """

    backend = "numba"
    _advance: Any
    _kernel_params: Any
    _n_work: int = 0
    _n_wv: int = 0

    def _buffers(self, k: int):
        d, dt = self.dim, self.tangent_dim
        return (np.empty(d), np.empty((dt, k)), np.empty((max(self._n_work, 1), max(d, dt), k)),
                np.empty((max(self._n_wv, 1), d)))

    def _xi(self, xi) -> np.ndarray:
        if xi is None:
            if self.noise_dim:
                raise ValueError(f"xi: {self.name} is random; pass a noise vector of length {self.noise_dim}")
            return np.empty(0)
        xi = np.ascontiguousarray(xi, dtype=np.float64).reshape(-1)
        if xi.shape[0] != self.noise_dim:
            raise ValueError(f"xi: expected length {self.noise_dim}, got {xi.shape[0]}")
        return xi

    def step(self, x, xi=None):
        x = np.ascontiguousarray(x, dtype=np.float64)
        x_out, V_out, work, wv = self._buffers(1)
        self._advance(x, self._kernel_params, self._xi(xi), np.zeros((self.tangent_dim, 1)), x_out, V_out, work, wv)
        return x_out

    def tangent(self, x, xi, V):
        x = np.ascontiguousarray(x, dtype=np.float64)
        V = np.ascontiguousarray(V, dtype=np.float64)
        if V.ndim != 2 or V.shape[0] != self.tangent_dim:
            raise ValueError(f"V: expected shape ({self.tangent_dim}, k), got {V.shape}")
        x_out, V_out, work, wv = self._buffers(V.shape[1])
        self._advance(x, self._kernel_params, self._xi(xi), V, x_out, V_out, work, wv)
        return V_out

    def jacobian(self, x, xi=None):
        return self.tangent(x, xi, np.eye(self.tangent_dim))


# ---------------------------------------------------------------------------------------------
# helpers for user functions


class _Uncacheable(Exception):
    pass


_FROZEN_SCALARS = (int, float, complex, bool, str, bytes, type(None), np.integer, np.floating, np.bool_)
_FROZEN_BY_IDENTITY = (types.ModuleType, types.BuiltinFunctionType, np.ufunc, nb.core.dispatcher.Dispatcher)


def _frozen(v):
    """A hashable stand-in for a value numba freezes into compiled code (a global, a closure cell,
    a default), or :class:`_Uncacheable` for values that may change in place (arrays, lists, plain
    functions, objects)."""
    if isinstance(v, _FROZEN_SCALARS):
        return type(v), v
    if isinstance(v, _FROZEN_BY_IDENTITY):
        return "object", v  # hashed by identity; the key keeps it alive, so its id is never reused
    if isinstance(v, tuple):
        return ("tuple",) + tuple(_frozen(u) for u in v)
    raise _Uncacheable


def _code_names(code) -> set:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):  # nested functions, comprehensions
            names |= _code_names(c)
    return names


def _jit_key(fn):
    """What numba's compiled code of ``fn`` depends on: its code, and the values it reads from its
    globals, closure and defaults (numba freezes these at compile time). None when one of them is
    mutable, so that such a function is compiled afresh for every system, as numba would."""
    try:
        g = fn.__globals__
        glob = tuple(sorted((n, _frozen(g[n])) for n in _code_names(fn.__code__) if n in g))
        cells = tuple(_frozen(c.cell_contents) for c in (fn.__closure__ or ()))
        return (fn.__code__, id(g), glob, cells, _frozen(fn.__defaults__ or ()),
                _frozen(tuple(sorted((fn.__kwdefaults__ or {}).items()))))
    except (_Uncacheable, AttributeError, ValueError, TypeError):  # ValueError: an empty cell
        return None


#: jitted user functions by :func:`_jit_key`: {key: (function, dispatcher)}, the oldest dropped first
_JITTED: dict = {}
_JITTED_MAX = 256


def _jit_user(fn: Callable, argname: str):
    """Jit a user function with rdsim's flags (already-jitted dispatchers are kept).

    A function whose code and frozen values (globals, closure, defaults: scalars, modules, jitted
    functions) equal those of one jitted before gets that dispatcher back, so that building the
    same map again (a scan over a parameter passed in ``params``, a map defined inside a factory)
    compiles nothing, and the engine's kernels for it are reused too. Functions that read arrays or
    other mutable objects from outside are compiled afresh each time.
    """
    if isinstance(fn, nb.core.dispatcher.Dispatcher) or hasattr(fn, "py_func"):
        return fn
    if not callable(fn):
        raise TypeError(f"{argname}: expected a function, got {type(fn).__name__}")
    key = _jit_key(fn) if isinstance(fn, types.FunctionType) else None
    if key is not None and key in _JITTED:
        return _JITTED[key][1]
    disp = nb.njit(**NUMBA_OPTIONS)(fn)
    if key is not None:
        if len(_JITTED) >= _JITTED_MAX:
            del _JITTED[next(iter(_JITTED))]
        _JITTED[key] = (fn, disp)  # fn kept alive, and with it its globals (whose id is in the key)
    return disp


@functools.lru_cache(maxsize=256)
def _bounds_checked(fn):
    """``fn`` (a dispatcher) compiled once more with bounds checking, for the probe call."""
    py = getattr(fn, "py_func", None)
    return nb.njit(boundscheck=True, **NUMBA_OPTIONS)(py) if py is not None else fn


def _call_compiled(fn, argname: str, *args):
    """Call a jitted user function, turning numba's compile errors into a TypeError."""
    try:
        return fn(*args)
    except nb.core.errors.NumbaError as err:
        msg = str(err).strip()
        raise TypeError(f"{argname}: numba cannot compile this function:\n{msg}") from None
    except IndexError:  # the bounds-checked probe of an in-place function (see _call_inplace)
        raise
    except Exception as err:  # the user's function itself raised on the probe point
        raise UserFunctionError(argname, err, where="the probe call at construction") from err


def _returned(out, argname: str, tuple_form: str):
    """``out`` if it is an array or a tuple (the returning styles), else a TypeError naming ``argname``."""
    if not isinstance(out, (tuple, np.ndarray)):
        raise TypeError(f"{argname}: must return a numpy array or {tuple_form}, returned {type(out).__name__}")
    return out


def _check_params(params):
    if not isinstance(params, tuple):
        raise TypeError(f"params: expected a tuple of floats and/or arrays, got {type(params).__name__}")
    return params


def _check_noise_fn(noise, argname: str = "noise") -> int:
    """Validate a noise(rng, n) function; returns the noise dimension m."""
    if not callable(noise):
        raise TypeError(f"{argname}: expected a function noise(rng, n) -> array (n, m), got {type(noise).__name__}")
    out = np.asarray(noise(np.random.default_rng(0), 3))
    if out.ndim != 2 or out.shape[0] != 3:
        raise ValueError(f"{argname}: noise(rng, n) must return an array of shape (n, m); for n=3 it returned shape {out.shape}")
    if not np.issubdtype(out.dtype, np.number):
        raise TypeError(f"{argname}: noise(rng, n) must return real numbers, got dtype {out.dtype}")
    return int(out.shape[1])


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim: expected a positive integer, got {dim!r}")
    return int(dim)


def _probe_point(dim: int) -> np.ndarray:
    # a generic point (not a symmetric one such as 0) to call user functions on once
    return 0.1 + 0.01 * np.arange(dim, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Map


def _n_params(fn) -> int:
    """Number of positional parameters of a (possibly jitted) user function."""
    import inspect

    try:
        return len(inspect.signature(getattr(fn, "py_func", fn)).parameters)
    except (TypeError, ValueError):
        return 3


def _call_inplace(fn, argname: str, *args):
    """Probe call of an in-place user function, compiled once more with bounds checking.

    The fast kernels run without bounds checks, so a wrong ``dim`` would silently write past
    ``out``; this one call turns that into a ValueError at construction.
    """
    checked = _bounds_checked(fn)
    try:
        _call_compiled(checked, argname, *args)
    except IndexError as err:
        out = args[-1]
        raise ValueError(f"{argname}: the in-place form writes outside out (shape {out.shape}): {err}") from None


#: Styles of a Map's user functions (see :class:`Map`).
_RETURNING, _INPLACE, _TUPLE = "returning", "in place", "tuple"


def _is_real_scalar(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _describe(v) -> str:
    if isinstance(v, tuple):
        return f"a tuple of length {len(v)}"
    shape = getattr(v, "shape", None)
    return f"{type(v).__name__}" + (f" of shape {shape}" if shape is not None else "")


def _check_tuple_step(y, d: int):
    """Validate the probe result of a tuple-style step: a flat tuple of d real numbers."""
    if len(y) != d or not all(_is_real_scalar(v) for v in y):
        what = f"a tuple of length {len(y)}" if len(y) != d else \
            f"a tuple whose entries are {[_describe(v) if not _is_real_scalar(v) else type(v).__name__ for v in y]}"
        raise ValueError(f"step: the tuple form must return a tuple of {d} floats (one per coordinate), "
                         f"returned {what}")


def _check_tuple_jac(J, d: int):
    """Validate the probe result of a tuple-style jacobian: d rows, each a tuple of d real numbers."""
    expected = f"a tuple of {d} rows, each a tuple of {d} floats ({d} x {d})"
    if not all(isinstance(row, tuple) for row in J):
        raise ValueError(f"jacobian: the tuple form must return {expected}, returned a flat tuple of length "
                         f"{len(J)} (rows must be tuples)")
    if len(J) != d:
        raise ValueError(f"jacobian: the tuple form must return {expected}, returned a tuple of {len(J)} rows")
    for i, row in enumerate(J):
        if len(row) != d or not all(_is_real_scalar(v) for v in row):
            what = f"has length {len(row)}" if len(row) != d else "has an entry that is not a real number"
            raise ValueError(f"jacobian: the tuple form must return {expected}; row {i} {what}")


@nb.njit(inline="always", **NUMBA_OPTIONS)
def _unused(*args):  # stands in for the tuple helpers a map does not need
    pass


@functools.lru_cache(maxsize=None)
def _tuple_kernel(kind: str, d: int):
    """Generated straight-line code with constant indices for a tuple-style Map of dimension d.

    ``vec``: ``copy_vec(y, out)``, out[i] = y[i]; ``mat``: ``copy_mat(J, out)``, out[i, p] = J[i][p];
    ``push``: ``push(J, V, out)``, out <- J @ V read straight from the tuple of rows, summed left
    to right from 0.0 exactly like the array path (so all styles agree to the last bit).
    Constant indices work for any tuple type (also mixed float/int entries, which numba types
    as a heterogeneous ``Tuple`` that a loop index cannot address), and the tuple stays in
    registers.
    """
    if kind == "vec":
        lines = ["def fn(y, out):"] + [f"    out[{i}] = y[{i}]" for i in range(d)]
    elif kind == "mat":
        lines = ["def fn(J, out):"] + [f"    out[{i}, {p}] = J[{i}][{p}]" for i in range(d) for p in range(d)]
    else:
        lines = ["def fn(J, V, out):", "    for j in range(V.shape[1]):"]
        for i in range(d):
            lines += ["        s = 0.0"] + [f"        s += J[{i}][{p}] * V[{p}, j]" for p in range(d)]
            lines.append(f"        out[{i}, j] = s")
    namespace: dict = {}
    exec(compile("\n".join(lines) + "\n", f"<rdsim tuple {kind} d={d}>", "exec"), namespace)
    return nb.njit(inline="always", **NUMBA_OPTIONS)(namespace["fn"])


@functools.lru_cache(maxsize=256)  # same functions and sizes: the same kernel (and engine loop)
def _make_map_advance(step_j, jac_j, d, step_style, jac_style):
    # inline="always": the engine inlines this kernel into its loop (numba IR inlining), so an
    # in-place or tuple user map costs no call, allocation or reference count per step.
    # The style flags are closure constants: numba prunes the branches not taken.
    step_inplace = step_style == _INPLACE
    step_tuple = step_style == _TUPLE
    jac_inplace = jac_style == _INPLACE
    jac_tuple = jac_style == _TUPLE
    # above SMALL_DIM_MAX the tangent push J @ V goes to BLAS: the loop below is O(d^2 k) scalar
    # work with a strided inner loop (about 10x slower than dgemm at d = 500, k = d). Small d keep
    # the loop, and with it their results to the last bit.
    blas = d > SMALL_DIM_MAX
    copy_vec = _tuple_kernel("vec", d) if step_tuple else _unused
    copy_mat = _tuple_kernel("mat", d) if jac_tuple and blas else _unused
    push = _tuple_kernel("push", d) if jac_tuple and not blas else _unused

    @nb.njit(inline="always", **NUMBA_OPTIONS)
    def advance(x, params, xi, V, x_out, V_out, work, wv):
        if jac_inplace:
            J = wv  # (d, d) scratch (the map asks for n_wv = d rows), zero-filled on entry
            for i in range(d):
                for p in range(d):
                    J[i, p] = 0.0
            jac_j(x, params, xi, J)
        elif jac_tuple:
            Jt = jac_j(x, params, xi)
            if blas:
                J = wv  # every entry is overwritten
                copy_mat(Jt, J)
        else:
            J = jac_j(x, params, xi)
        if step_inplace:
            step_j(x, params, xi, x_out)
        elif step_tuple:
            copy_vec(step_j(x, params, xi), x_out)
        else:
            y = step_j(x, params, xi)
            for i in range(d):
                x_out[i] = y[i]
        if blas:
            matmul_into(J, V, V_out)
        elif jac_tuple:
            push(Jt, V, V_out)
        else:
            # V_out <- J @ V, d a compile-time constant (sums left to right, as matmul_into)
            for j in range(V.shape[1]):
                for i in range(d):
                    s = 0.0
                    for p in range(d):
                        s += J[i, p] * V[p, j]
                    V_out[i, j] = s

    return advance


class Map(AbstractNumbaSystem):
    """A (random) map x_{t+1} = step(x_t, params, xi_t) defined by plain numba-compilable functions.

    Each function comes in one of three styles, told apart by its number of parameters and (for
    3 parameters) by what the compiled function returns:

    * returning arrays (3 parameters): ``step(x, params, xi) -> x_next`` (an array of shape (dim,))
      and ``jacobian(x, params, xi) -> (dim, dim)`` array. The simplest to write and the slowest:
      each call allocates (one heap array per step; several for ``np.array`` of a nested *list*),
      about 0.1 of a hand-written numba loop on the 2-d Hénon map.
    * returning tuples (3 parameters): ``step(x, params, xi) -> (y_0, ..., y_{dim-1})``, a tuple of
      dim floats, and ``jacobian(x, params, xi) -> ((J_00, ..., J_0,dim-1), ..., (J_dim-1,0, ...))``,
      a tuple of dim rows of dim floats. numba keeps tuples on the stack, so nothing is
      allocated and the engine inlines the call: as fast as the in-place style (about 0.5-0.6
      of the hand kernel, ``benchmarks/bench_engine.py``) and as easy to read as the returning
      one. Meant for small dim: compile time grows fast with the tuple size (the user's nested
      tuple and rdsim's generated copy of dim^2 lines; dim = 50 took about 5 minutes to
      compile on a 2-core machine), so use the in-place style beyond a few dozen.
    * in place (4 parameters): ``step(x, params, xi, out)`` writes x_next into ``out`` (dim,), and
      ``jacobian(x, params, xi, out)`` writes the Jacobian into ``out`` (dim, dim), which is
      zero-filled on entry, so entries that are always zero can be left alone. Nothing is
      returned; ``out`` never aliases ``x``. No allocation either, inlined into the engine's loop:
      about 0.5-0.6 of the hand kernel; the style to use at larger dim.

    All styles give bitwise identical results (the tangent push sums J[i, p] V[p, j] in the same
    order), and they can be mixed (e.g. a tuple step with an in-place jacobian). Above
    dim = ``SMALL_DIM_MAX`` (48) the tangent push J @ V is a BLAS product.

    Building the same map again (a scan over ``params``, a map defined in a factory) compiles
    nothing: functions equal in code and frozen values reuse their compiled kernels (see
    :func:`_jit_user`).

    Args:
        step: ``step(x, params, xi) -> x_next`` or ``step(x, params, xi, out)`` (see above),
            x of shape (dim,).
        jacobian: ``jacobian(x, params, xi) -> (dim, dim)`` or ``jacobian(x, params, xi, out)``,
            the derivative of ``step`` in x.
        dim: state dimension.
        params: tuple of floats and/or arrays passed to both functions unchanged.
        noise: None (deterministic; ``xi`` has length 0) or ``noise(rng, n) -> (n, m)``, the noise of
            n consecutive steps. rdsim draws it in fixed chunks so the sequence depends only on
            the seed; the function itself should draw row by row (``rng.standard_normal((n, m))``
            does) so that its output does not depend on n either (checked by
            :func:`rdsim.testing.check_system`).
        name: label used in messages and tables.
        x0: optional default initial state.

    Raises:
        TypeError: a function numba cannot compile (with numba's message), params not a tuple.
        ValueError: dim not a positive integer, functions returning the wrong shape (for the tuple
            style: a step tuple whose length is not dim, a jacobian that is not dim rows of dim
            floats), an in-place function writing outside ``out`` or (step) leaving part of it
            unwritten.

    Example:
        >>> import numpy as np, rdsim
        >>> def step(x, p, xi): return np.array([1.0 - p[0] * x[0] ** 2 + x[1], p[1] * x[0]])
        >>> def jac(x, p, xi): return np.array([[-2.0 * p[0] * x[0], 1.0], [p[1], 0.0]])
        >>> henon = rdsim.Map(step, jac, 2, params=(1.4, 0.3))
        >>> res = rdsim.lyapunov_spectrum(henon, [0.1, 0.1], 20_000, transient=1000)
        >>> bool(abs(res.exponents.sum() - np.log(0.3)) < 1e-10)
        True

        The same map in place (the fast path):

        >>> def step_(x, p, xi, out):
        ...     out[0] = 1.0 - p[0] * x[0] ** 2 + x[1]
        ...     out[1] = p[1] * x[0]
        >>> def jac_(x, p, xi, out):
        ...     out[0, 0] = -2.0 * p[0] * x[0]
        ...     out[0, 1] = 1.0
        ...     out[1, 0] = p[1]
        >>> henon_ = rdsim.Map(step_, jac_, 2, params=(1.4, 0.3))
        >>> res_ = rdsim.lyapunov_spectrum(henon_, [0.1, 0.1], 20_000, transient=1000)
        >>> bool(np.array_equal(res_.exponents, res.exponents))
        True

        And returning tuples (as fast, no ``out``):

        >>> def step_t(x, p, xi): return (1.0 - p[0] * x[0] ** 2 + x[1], p[1] * x[0])
        >>> def jac_t(x, p, xi): return ((-2.0 * p[0] * x[0], 1.0), (p[1], 0.0))
        >>> henon_t = rdsim.Map(step_t, jac_t, 2, params=(1.4, 0.3))
        >>> res_t = rdsim.lyapunov_spectrum(henon_t, [0.1, 0.1], 20_000, transient=1000)
        >>> bool(np.array_equal(res_t.exponents, res.exponents))
        True
    """

    def __init__(self, step, jacobian, dim, *, params=(), noise=None, name=None, x0=None):
        self.dim = _check_dim(dim)
        self.params = _check_params(params)
        self.name = name or getattr(step, "__name__", "map")
        self.dt = 1.0
        if noise is None:
            self.noise_dim = 0
            self._noise = None
        else:
            self.noise_dim = _check_noise_fn(noise)
            self._noise = noise
        self._step_fn = _jit_user(step, "step")
        self._jac_fn = _jit_user(jacobian, "jacobian")
        x = _probe_point(self.dim)
        xi = np.zeros(self.noise_dim) if self._noise is None else np.ascontiguousarray(
            self.sample_noise(np.random.default_rng(0), 1)[0])
        self._step_style = _INPLACE if _n_params(step) == 4 else _RETURNING
        self._jac_style = _INPLACE if _n_params(jacobian) == 4 else _RETURNING
        if self._step_style == _INPLACE:
            out = np.full(self.dim, np.nan)
            _call_inplace(self._step_fn, "step", x, self.params, xi, out)
            if np.isnan(out).any():
                raise ValueError(f"step: the in-place form step(x, params, xi, out) must write all {self.dim} "
                                 f"entries of out; entries {np.flatnonzero(np.isnan(out)).tolist()} were not written")
        else:
            out = _returned(_call_compiled(self._step_fn, "step", x, self.params, xi), "step",
                            f"a tuple of {self.dim} floats")
            if isinstance(out, tuple):
                _check_tuple_step(out, self.dim)
                self._step_style = _TUPLE
            out = np.asarray(out)
        if out.shape != (self.dim,):
            raise ValueError(f"step: must return an array of shape ({self.dim},), returned shape {out.shape}")
        if self._jac_style == _INPLACE:
            J = np.zeros((self.dim, self.dim))
            _call_inplace(self._jac_fn, "jacobian", x, self.params, xi, J)
        else:
            J = _returned(_call_compiled(self._jac_fn, "jacobian", x, self.params, xi), "jacobian",
                          f"a tuple of {self.dim} rows")
            if isinstance(J, tuple):
                _check_tuple_jac(J, self.dim)
                self._jac_style = _TUPLE
            J = np.asarray(J)
        if J.shape != (self.dim, self.dim):
            raise ValueError(f"jacobian: must return an array of shape ({self.dim}, {self.dim}), returned shape {J.shape}")
        self._step_inplace = self._step_style == _INPLACE
        self._jac_inplace = self._jac_style == _INPLACE
        self._advance = _make_map_advance(self._step_fn, self._jac_fn, self.dim, self._step_style,
                                          self._jac_style)
        self._kernel_params = self.params
        self._n_wv = self.dim
        if x0 is not None:
            self.x0 = self.initial_state(x0)

    def sample_noise(self, rng, n):
        if self._noise is None:
            return np.empty((n, 0))
        out = np.ascontiguousarray(self._noise(rng, n), dtype=np.float64)
        if out.shape != (n, self.noise_dim):
            raise ValueError(f"noise: noise(rng, {n}) returned shape {out.shape}, expected ({n}, {self.noise_dim})")
        return out

    def jacobian(self, x, xi=None):
        x = np.ascontiguousarray(x, dtype=np.float64)
        xi = self._xi(xi)
        if self._jac_inplace:
            J = np.zeros((self.dim, self.dim))
            self._jac_fn(x, self.params, xi, J)
            return J
        return np.asarray(self._jac_fn(x, self.params, xi), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Flow


@functools.lru_cache(maxsize=256)  # same functions and sizes: the same kernel (and engine loop)
def _make_rk4_advance(rhs_j, jac_j):
    # exact derivative of one classical RK4 step, pushed on the block V
    @nb.njit(**NUMBA_OPTIONS)
    def advance(x, kp, xi, V, x_out, V_out, work, wv):
        dt = kp[0]
        p = kp[1]
        d = x.shape[0]
        k = V.shape[1]
        y = wv[0]
        K = work[0]
        Y = work[1]
        acc = work[2]
        # stage 1
        J = jac_j(x, p, xi)
        f = rhs_j(x, p)
        matmul_into(J, V, K)
        for i in range(d):
            x_out[i] = x[i] + dt / 6.0 * f[i]
            y[i] = x[i] + 0.5 * dt * f[i]
            for j in range(k):
                acc[i, j] = V[i, j] + dt / 6.0 * K[i, j]
                Y[i, j] = V[i, j] + 0.5 * dt * K[i, j]
        # stages 2 and 3
        for stage in range(2):
            J = jac_j(y, p, xi)
            f = rhs_j(y, p)
            matmul_into(J, Y, K)
            h = 0.5 * dt if stage == 0 else dt
            for i in range(d):
                x_out[i] += dt / 3.0 * f[i]
                y[i] = x[i] + h * f[i]
                for j in range(k):
                    acc[i, j] += dt / 3.0 * K[i, j]
                    Y[i, j] = V[i, j] + h * K[i, j]
        # stage 4
        J = jac_j(y, p, xi)
        f = rhs_j(y, p)
        matmul_into(J, Y, K)
        for i in range(d):
            x_out[i] += dt / 6.0 * f[i]
            for j in range(k):
                V_out[i, j] = acc[i, j] + dt / 6.0 * K[i, j]

    return advance


@functools.lru_cache(maxsize=256)  # same functions and sizes: the same kernel (and engine loop)
def _make_em_advance(rhs_j, jac_j, diff_j, djac_j):
    # Euler-Maruyama: x' = x + F(x) dt + G(x) * sqrt(dt) xi;  Dx' = I + dt DF + diag(sqrt(dt) xi) DG
    @nb.njit(**NUMBA_OPTIONS)
    def advance(x, kp, xi, V, x_out, V_out, work, wv):
        dt = kp[0]
        p = kp[1]
        d = x.shape[0]
        k = V.shape[1]
        sq = np.sqrt(dt)
        f = rhs_j(x, p)
        g = diff_j(x, p)
        J = jac_j(x, p, xi)
        Jg = djac_j(x, p, xi)
        K = work[0]
        Kg = work[1]
        matmul_into(J, V, K)
        matmul_into(Jg, V, Kg)
        for i in range(d):
            dw = sq * xi[i]
            x_out[i] = x[i] + dt * f[i] + g[i] * dw
            for j in range(k):
                V_out[i, j] = V[i, j] + dt * K[i, j] + dw * Kg[i, j]

    return advance


@functools.lru_cache(maxsize=256)  # same functions and sizes: the same kernel (and engine loop)
def _wrap_xi(fn):
    """Adapt fn(x, params) to the (x, params, xi) calling convention of the kernels."""

    @nb.njit(**NUMBA_OPTIONS)
    def wrapped(x, p, xi):
        return fn(x, p)

    return wrapped


class Flow(AbstractNumbaSystem):
    """An ODE dx = F(x) dt (RK4) or Ito SDE dx = F(x) dt + G(x) dW (Euler-Maruyama), as a map of step dt.

    The tangent map is the exact derivative of the same discrete step (RK4 or Euler-Maruyama), so
    the QR engine measures the exponents of the integrator's map; they are reported per unit time.
    For an SDE the noise is diagonal: G(x) = diag(diffusion(x)), xi_t ~ N(0, I), dW = sqrt(dt) xi_t.

    Args:
        rhs: ``rhs(x, params) -> (dim,)``, the drift F.
        jacobian: ``jacobian(x, params) -> (dim, dim)``, DF.
        dim: state dimension.
        dt: integration step (> 0).
        params: tuple of floats and/or arrays.
        diffusion: ``diffusion(x, params) -> (dim,)``, the diagonal of G (None: an ODE).
        diffusion_jacobian: ``(x, params) -> (dim, dim)``, the derivative of ``diffusion``
            (required with ``diffusion``; entry (i, j) = d g_i / d x_j).
        name: label.
        x0: optional default initial state.

    Example:
        >>> import numpy as np, rdsim
        >>> def f(x, p): return p[0] * x
        >>> def J(x, p): return np.array([[p[0]]])
        >>> def g(x, p): return p[1] * x
        >>> def Jg(x, p): return np.array([[p[1]]])
        >>> gbm = rdsim.Flow(f, J, 1, dt=1e-3, params=(0.2, 0.5), diffusion=g, diffusion_jacobian=Jg)
        >>> res = rdsim.lyapunov_spectrum(gbm, [1.0], 400_000)
        >>> bool(abs(res.exponents[0] - (0.2 - 0.5 ** 2 / 2)) < 5 * res.stderr[0] + 2e-3)
        True
    """

    def __init__(self, rhs, jacobian, dim, *, dt, params=(), diffusion=None, diffusion_jacobian=None,
                 name=None, x0=None):
        self.dim = _check_dim(dim)
        self.params = _check_params(params)
        try:
            dt = float(dt)
        except (TypeError, ValueError):
            raise TypeError(f"dt: expected a positive float, got {type(dt).__name__}") from None
        if not (np.isfinite(dt) and dt > 0):
            raise ValueError(f"dt: expected a positive finite step, got {dt}")
        self.dt = dt
        self.name = name or getattr(rhs, "__name__", "flow")
        if (diffusion is None) != (diffusion_jacobian is None):
            raise ValueError("diffusion_jacobian: diffusion and diffusion_jacobian must be given together")
        self.sde = diffusion is not None
        self.noise_dim = self.dim if self.sde else 0
        self._rhs_fn = _jit_user(rhs, "rhs")
        self._jac_fn = _jit_user(jacobian, "jacobian")
        x = _probe_point(self.dim)
        checks = [("rhs", self._rhs_fn, (self.dim,)), ("jacobian", self._jac_fn, (self.dim, self.dim))]
        if self.sde:
            self._diff_fn = _jit_user(diffusion, "diffusion")
            self._djac_fn = _jit_user(diffusion_jacobian, "diffusion_jacobian")
            checks += [("diffusion", self._diff_fn, (self.dim,)),
                       ("diffusion_jacobian", self._djac_fn, (self.dim, self.dim))]
        for argname, fn, shape in checks:
            out = np.asarray(_call_compiled(fn, argname, x, self.params))
            if out.shape != shape:
                raise ValueError(f"{argname}: must return an array of shape {shape}, returned shape {out.shape}")
        jac3 = _wrap_xi(self._jac_fn)
        if self.sde:
            self._advance = _make_em_advance(self._rhs_fn, jac3, self._diff_fn, _wrap_xi(self._djac_fn))
            self._n_work = 2
        else:
            self._advance = _make_rk4_advance(self._rhs_fn, jac3)
            self._n_work = 3
        self._n_wv = 1
        self._kernel_params = (self.dt, self.params)
        if x0 is not None:
            self.x0 = self.initial_state(x0)

    def sample_noise(self, rng, n):
        if not self.sde:
            return np.empty((n, 0))
        return rng.standard_normal((n, self.dim))


# ---------------------------------------------------------------------------------------------
# noise


class NoiseStream:
    """The replayable noise xi_0, xi_1, ... of a system, drawn in fixed chunks from one generator.

    ``take(n)`` returns the next n noise vectors. The system's noise sampler is always called with
    exactly :data:`rdsim._config.NOISE_CHUNK` steps, so the sequence depends only on the seed, not
    on how the caller segments the run.
    """

    def __init__(self, system: AbstractSystem, rng: np.random.Generator, chunk: int = NOISE_CHUNK):
        self.system = system
        self.rng = rng
        self.chunk = int(chunk)
        self.m = system.noise_dim
        self._buf = np.empty((0, self.m))
        self._pos = 0
        self._sampler = system.noise_sampler(rng) if self.m else None

    def take(self, n: int) -> np.ndarray:
        if self.m == 0:
            return np.empty((n, 0))
        parts = []
        need = n
        while need > 0:
            if self._pos >= self._buf.shape[0]:
                self._buf = np.ascontiguousarray(self._sampler(self.chunk), dtype=np.float64)
                if self._buf.shape != (self.chunk, self.m):
                    raise ValueError(f"noise: returned shape {self._buf.shape}, expected ({self.chunk}, {self.m})")
                self._pos = 0
            take = min(need, self._buf.shape[0] - self._pos)
            parts.append(self._buf[self._pos:self._pos + take])
            self._pos += take
            need -= take
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return np.ascontiguousarray(out, dtype=np.float64)
