"""The sweep configuration: a TOML file, validated against a schema; errors name key and line."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import tomllib
from pathlib import Path

__all__ = ["SweepConfigError", "SweepConfig", "load_config", "parse_config", "EXAMPLE_CONFIG"]


class SweepConfigError(ValueError):
    """A bad sweep configuration. ``key`` is the dotted key, ``line`` its line in the file (or None)."""

    def __init__(self, message: str, key: str | None = None, line: int | None = None,
                 source: str | None = None):
        self.key, self.line, self.source, self.reason = key, line, source, message
        where = source or "config"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {key + ': ' if key else ''}{message}")


EXAMPLE_CONFIG = '''\
# rdsim sweep example: SGD on a small MLP, 8x8 digits (scikit-learn, nothing downloaded),
# a 3 x 3 grid of (learning rate, batch size), about 10 s per run on one CPU core:
#   rdsim sweep --example > example.toml
#   rdsim sweep example.toml --out sweep-example --workers 2      (about a minute on 2 cores)

[sweep]
name = "digits-mlp-sgd"

[model]
kind = "mlp"            # "mlp", "paper_mlp" (bias-free 16-16) or "dln" (diagonal linear network)
width = 16
depth = 2
activation = "relu"
dtype = "float64"
device = "cpu"          # "cuda" requests one GPU per run (Ray: num_gpus = 1)

[data]
kind = "digits"         # "digits", "mnist1d", "sparse_regression" or "teacher"
n_train = 256           # first n_train samples of the train split (omit: all)
n_test = 359
seed = 0                # the data split (the grid seed only sets the init and the minibatches)

[optimizer]
kind = "sgd"            # "gd", "sgd", "momentum" or "adam"; fixed hyperparameters below
sampling = "iid"

[grid]
lr = [0.05, 0.1, 0.2]
batch_size = [16, 64, 256]  # integers, or "full"
seed = [0]

[train]
steps = 1000

[measure]
generalization = true   # train/test loss and accuracy, acc_gap = train - test acc, loss_gap = test - train loss

[measure.lambda_max]    # lambda_max of the full-batch Hessian (Lanczos)
n_iter = 20

[measure.trace]         # tr(H) by Hutchinson
n_probes = 16

[measure.sharpness_dimension]   # rdsim.torch.sharpness_dimension at the trained parameters
method = "exact"        # "exact", "slq", "kde" or "ps"
n_batches = 8

[measure.lyapunov]      # top-k Lyapunov exponents of the training map after training
k = 4
transient = 50
steps = 200

[measure.checkpoints]   # parameters every `every` steps (runs/<id>/checkpoints.npz)
every = 100
'''


# --- schema --------------------------------------------------------------------------------------
# a field: (kind, default, choices-or-None, minimum-or-None); kind in int, float, str, bool,
# "int_list", "float_list", "bs_list", "pair"; default REQUIRED means the key must be given.

REQUIRED = object()

_MODEL = {
    "kind": ("str", REQUIRED, ("mlp", "paper_mlp", "dln"), None),
    "width": ("int", 32, None, 1),
    "depth": ("int", 2, None, 1),
    "activation": ("str", "relu", None, None),
    "bias": ("bool", True, None, None),
    "init_scale": ("float", 0.1, None, 0.0),
    "init": ("str", "constant", ("constant", "gaussian", "even"), None),
    "dtype": ("str", "float64", ("float32", "float64"), None),
    "device": ("str", "cpu", None, None),
    "num_gpus": ("float", 1.0, None, 0.0),
}
_DATA = {
    "kind": ("str", REQUIRED, ("digits", "mnist1d", "sparse_regression", "teacher"), None),
    "n_train": ("int", None, None, 1),
    "n_test": ("int", None, None, 1),
    "seed": ("int", 0, None, 0),
    # digits
    "scale": ("str", "unit", ("unit", "standard", "none"), None),
    "test_fraction": ("float", 0.2, None, 0.0),
    # mnist1d
    "n": ("int", 1000, None, 10),
    # sparse regression / teacher
    "p": ("int", 50, None, 1),
    "sparsity": ("int", 5, None, 0),
    "noise": ("float", 0.0, None, 0.0),
    "in_dim": ("int", 10, None, 1),
    "out_dim": ("int", 1, None, 1),
    "teacher_width": ("int", 16, None, 1),
    "teacher_depth": ("int", 2, None, 1),
    "task": ("str", "regression", ("regression", "classification"), None),
}
_OPT = {
    "kind": ("str", REQUIRED, ("gd", "sgd", "momentum", "adam"), None),
    "sampling": ("str", "iid", ("iid", "epoch"), None),
    "beta": ("float", 0.9, None, 0.0),
    "beta1": ("float", 0.9, None, 0.0),
    "beta2": ("float", 0.999, None, 0.0),
    "eps": ("float", 1e-8, None, 0.0),
    "weight_decay": ("float", 0.0, None, 0.0),
    "decoupled": ("bool", False, None, None),
}
_GRID = {
    "lr": ("float_list", REQUIRED, None, 0.0),
    "batch_size": ("bs_list", ["full"], None, 1),
    "seed": ("int_list", [0], None, 0),
}
_TRAIN = {"steps": ("int", REQUIRED, None, 1)}
_SWEEP = {"name": ("str", "sweep", None, None), "description": ("str", "", None, None)}
_MEASURE_SCALARS = {"generalization": ("bool", True, None, None)}
_MEASURES = {
    "lambda_max": {"n_iter": ("int", 20, None, 2), "seed": ("int", 0, None, 0)},
    "trace": {"n_probes": ("int", 16, None, 1), "seed": ("int", 0, None, 0)},
    "sharpness_dimension": {
        "method": ("str", "exact", ("exact", "slq", "kde", "ps"), None),
        "n_batches": ("int", 32, None, 1),
        "batch_size": ("int", None, None, 1),
        "seed": ("int", 0, None, 0),
    },
    "lyapunov": {
        "k": ("int", 4, None, 1),
        "steps": ("int", REQUIRED, None, 1),
        "transient": ("int", 0, None, 0),
        "qr_every": ("int", 1, None, 1),
    },
    "checkpoints": {"every": ("int", REQUIRED, None, 1)},
}
_SECTIONS = {"sweep": _SWEEP, "model": _MODEL, "data": _DATA, "optimizer": _OPT, "grid": _GRID,
             "train": _TRAIN, "measure": None}


# --- line numbers --------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEYLINE = re.compile(r"^\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+)(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+))*)\s*=")


def _split_dotted(s: str) -> tuple[str, ...]:
    parts = re.findall(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_\-]+)", s)
    return tuple(a or b or c for a, b, c in parts)


def find_line(text: str, path: tuple[str, ...]) -> int | None:
    """1-based line of the key ``path`` in TOML ``text`` (table headers and dotted keys), or None.

    A scan of the text, not a parser: the line of ``key = ...`` inside the table ``[a.b]``
    (or a dotted ``b.key = ...`` inside ``[a]``), else the header ``[a.b.key]``, else the first
    line on which the last key appears as a word.
    """
    if not path:
        return None
    table: tuple[str, ...] = ()
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.split("#", 1)[0] if '"' not in line and "'" not in line else line
        m = _HEADER.match(stripped)
        if m and not _KEYLINE.match(stripped):
            table = _split_dotted(m.group(1))
            if table == tuple(path):
                return no
            continue
        m = _KEYLINE.match(line)
        if m and table + _split_dotted(m.group(1)) == tuple(path):
            return no
        if m and len(path) > len(table) and tuple(path[:len(table)]) == table:
            full = table + _split_dotted(m.group(1))
            if tuple(path[:len(full)]) == full and len(full) < len(path):
                # an inline table `key = { ... }` holding the rest of the path
                if re.search(rf"(?<![A-Za-z0-9_\-]){re.escape(path[-1])}\s*=", line):
                    return no
    word = re.compile(rf"(?<![A-Za-z0-9_\-]){re.escape(path[-1])}(?![A-Za-z0-9_\-])")
    for no, line in enumerate(text.splitlines(), 1):
        if word.search(line):
            return no
    return None


# --- validation ----------------------------------------------------------------------------------

class _Checker:
    def __init__(self, text: str, source: str | None):
        self.text, self.source = text, source

    def error(self, path: tuple[str, ...], message: str) -> SweepConfigError:
        line = find_line(self.text, path)
        if line is None and len(path) > 1:
            line = find_line(self.text, path[:-1])
        return SweepConfigError(message, ".".join(path), line, self.source)

    def table(self, raw, path, schema) -> dict:
        if not isinstance(raw, dict):
            raise self.error(path, f"expected a table [{'.'.join(path)}], got {_tname(raw)}")
        for key in raw:
            if key not in schema:
                raise self.error(path + (key,), f"unknown key; known keys of [{'.'.join(path)}]: "
                                 f"{', '.join(sorted(schema))}")
        out = {}
        for key, (kind, default, choices, minimum) in schema.items():
            if key not in raw:
                if default is REQUIRED:
                    raise self.error(path, f"missing required key {key!r}")
                out[key] = copy.deepcopy(default)
                continue
            out[key] = self.value(raw[key], path + (key,), kind, choices, minimum)
        return out

    def value(self, v, path, kind, choices, minimum):
        def bad(expected):
            return self.error(path, f"expected {expected}, got {_tname(v)} {v!r}")

        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad("an integer")
            if minimum is not None and v < minimum:
                raise self.error(path, f"expected an integer >= {minimum}, got {v}")
            return v
        if kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad("a finite number")
            if minimum is not None and v < minimum:
                raise self.error(path, f"expected a number >= {minimum}, got {v}")
            return float(v)
        if kind == "bool":
            if not isinstance(v, bool):
                raise bad("true or false")
            return v
        if kind == "str":
            if not isinstance(v, str):
                raise bad("a string")
            if choices is not None and v not in choices:
                raise self.error(path, f"expected one of {', '.join(repr(c) for c in choices)}, got {v!r}")
            return v
        if kind in ("int_list", "float_list", "bs_list"):
            if not isinstance(v, list):
                raise bad("a list")
            if not v:
                raise self.error(path, "empty grid: expected at least one value")
            out = []
            for i, e in enumerate(v):
                if kind == "float_list":
                    if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
                        raise self.error(path, f"entry {i}: expected a positive number, got {e!r}")
                    out.append(float(e))
                elif kind == "bs_list" and e == "full":
                    out.append("full")
                else:
                    if isinstance(e, bool) or not isinstance(e, int) or e < minimum:
                        what = "a positive integer or \"full\"" if kind == "bs_list" else f"an integer >= {minimum}"
                        raise self.error(path, f"entry {i}: expected {what}, got {e!r}")
                    out.append(e)
            if len(set(out)) != len(out):
                raise self.error(path, f"repeated values in {v!r}")
            return out
        raise AssertionError(kind)


def _tname(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


class SweepConfig:
    """A validated sweep configuration.

    Attributes:
        data: the normalised configuration, a dict of sections (every default filled in).
        text: the TOML source. source: its file name (for messages).
        points: the grid points, a list of dicts {"lr", "batch_size", "seed"} in grid order.
        measures: names of the enabled measurements.
    """

    def __init__(self, data: dict, text: str, source: str | None = None):
        self.data, self.text, self.source = data, text, source

    @property
    def points(self) -> list[dict]:
        g = self.data["grid"]
        return [{"lr": lr, "batch_size": bs, "seed": s}
                for lr in g["lr"] for bs in g["batch_size"] for s in g["seed"]]

    @property
    def measures(self) -> list[str]:
        m = self.data["measure"]
        out = ["generalization"] if m["generalization"] else []
        return out + [k for k in _MEASURES if m.get(k) is not None]

    def fingerprint(self) -> str:
        """sha256 of the normalised configuration (what a run's results depend on)."""
        blob = json.dumps(self.data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"SweepConfig({self.data['sweep']['name']!r}, {len(self.points)} runs, measures={self.measures})"


def parse_config(text: str, source: str | None = None) -> SweepConfig:
    """Validate a TOML sweep configuration given as text. Raises :class:`SweepConfigError`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"line (\d+)", str(err))
        raise SweepConfigError(f"not valid TOML ({err})", None, int(m.group(1)) if m else None,
                               source) from None
    ck = _Checker(text, source)
    for key in raw:
        if key not in _SECTIONS:
            raise ck.error((key,), f"unknown section; known: {', '.join(sorted(_SECTIONS))}")
    for key in ("model", "data", "optimizer", "grid", "train"):
        if key not in raw:
            raise SweepConfigError(f"missing required table [{key}]", key, None, source)
    data = {
        "sweep": ck.table(raw.get("sweep", {}), ("sweep",), _SWEEP),
        "model": ck.table(raw["model"], ("model",), _MODEL),
        "data": ck.table(raw["data"], ("data",), _DATA),
        "optimizer": ck.table(raw["optimizer"], ("optimizer",), _OPT),
        "grid": ck.table(raw["grid"], ("grid",), _GRID),
        "train": ck.table(raw["train"], ("train",), _TRAIN),
    }
    mraw = raw.get("measure", {})
    if not isinstance(mraw, dict):
        raise ck.error(("measure",), f"expected a table [measure], got {_tname(mraw)}")
    measure = {}
    for key, val in mraw.items():
        if key in _MEASURE_SCALARS:
            kind, _d, ch, mn = _MEASURE_SCALARS[key]
            measure[key] = ck.value(val, ("measure", key), kind, ch, mn)
        elif key in _MEASURES:
            if val is False:
                continue
            if val is True:
                val = {}
            measure[key] = ck.table(val, ("measure", key), _MEASURES[key])
        else:
            raise ck.error(("measure", key), "unknown measurement; known: "
                           f"{', '.join(sorted(list(_MEASURE_SCALARS) + list(_MEASURES)))}")
    measure.setdefault("generalization", True)
    for key in _MEASURES:
        measure.setdefault(key, None)
    data["measure"] = measure
    _cross_checks(ck, data)
    return SweepConfig(data, text, source)


def _cross_checks(ck: _Checker, d: dict) -> None:
    opt, grid, model, dat = d["optimizer"], d["grid"], d["model"], d["data"]
    if opt["kind"] == "gd" and grid["batch_size"] != ["full"]:
        raise ck.error(("grid", "batch_size"), 'optimizer "gd" is full batch: use batch_size = ["full"] '
                       '(or optimizer kind "sgd")')
    if opt["kind"] == "sgd" and "full" in grid["batch_size"]:
        raise ck.error(("grid", "batch_size"), 'optimizer "sgd" needs integer batch sizes '
                       '(use kind "gd" for the full batch)')
    for key in ("beta", "beta1", "beta2"):
        if not opt[key] < 1:
            raise ck.error(("optimizer", key), f"expected a number in [0, 1), got {opt[key]}")
    if model["kind"] == "dln" and dat["kind"] != "sparse_regression":
        raise ck.error(("model", "kind"), 'a "dln" model needs data kind = "sparse_regression"')
    if model["kind"] in ("mlp", "paper_mlp") and dat["kind"] == "sparse_regression":
        raise ck.error(("data", "kind"), '"sparse_regression" data go with model kind = "dln"')
    if not (model["device"] == "cpu" or model["device"].startswith("cuda")):
        raise ck.error(("model", "device"), f'expected "cpu" or "cuda[:i]", got {model["device"]!r}')
    if dat["kind"] == "digits" and not 0 < dat["test_fraction"] < 1:
        raise ck.error(("data", "test_fraction"), f"expected a number in (0, 1), got {dat['test_fraction']}")
    lyap = d["measure"]["lyapunov"]
    if lyap is not None and lyap["qr_every"] > 1 and lyap["steps"] < lyap["qr_every"]:
        raise ck.error(("measure", "lyapunov", "steps"), "expected at least qr_every steps")
    n_train = dat["n_train"]
    if n_train is not None:
        for bs in grid["batch_size"]:
            if bs != "full" and bs > n_train:
                raise ck.error(("grid", "batch_size"), f"batch size {bs} exceeds data.n_train = {n_train}")


def load_config(path) -> SweepConfig:
    """Read and validate a sweep configuration file (TOML)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SweepConfigError(f"cannot read the file ({err.strerror})", None, None, str(path)) from None
    return parse_config(text, str(path))
