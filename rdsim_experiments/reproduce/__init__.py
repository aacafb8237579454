"""Reproductions of the papers' findings: ``rdsim reproduce NAME [--quick] [--out DIR] [--resume]``.

Each experiment is a module of this package with

* ``NAME`` (the command-line name), ``TITLE`` (one line for ``--list``), ``CLAIM`` (the paper's claim);
* ``run(out: Path, quick: bool, store: Store, log) -> dict``: runs the experiment, writes its
  figures (PNG) into ``out`` and returns a summary dict of the measured numbers (JSON-able),
  including ``"verdict"`` (``"agrees"``, ``"partly"``, ``"disagrees"`` or ``"inconclusive"``) and
  ``"verdict_reason"``.

Long runs are split into units (one learning rate, one checkpoint, ...) whose results are kept
in a :class:`Store`: every unit is written atomically when it finishes, so a killed run resumed
with ``--resume`` skips finished units and ends with the same summary. The summary is written to
``out/summary.json`` (atomically) at the end.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Callable

from rdsim._io import atomic_write_bytes

__all__ = ["EXPERIMENTS", "ExperimentExistsError", "Store", "list_experiments", "run_experiment"]

#: command-line name -> module (in run order)
EXPERIMENTS = {
    "eos": "rdsim_experiments.reproduce.eos",
    "sd-generalization": "rdsim_experiments.reproduce.sd_generalization",
    "sd-generalization-eos": "rdsim_experiments.reproduce.sd_generalization_eos",
    "sd-generalization-paper": "rdsim_experiments.reproduce.sd_generalization_paper",
    "grokking": "rdsim_experiments.reproduce.grokking",
    "dln": "rdsim_experiments.reproduce.dln",
    "fractal": "rdsim_experiments.reproduce.fractal",
    "ladder": "rdsim_experiments.reproduce.ladder",
    "lyapunov-vs-sd": "rdsim_experiments.reproduce.lyapunov_vs_sd",
}


def _json_default(o):
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def dumps(obj) -> bytes:
    """JSON with numpy values converted and NaN kept (as NaN, which json reads back)."""
    return json.dumps(obj, default=_json_default, indent=1, sort_keys=True).encode()


class Store:
    """Finished units of an experiment, one JSON file each under ``out/units/`` (atomic writes).

    ``store.get(key, compute)`` returns the stored value of ``key`` if the run is resumed and the
    unit is done; otherwise it calls ``compute()``, writes the result atomically and returns it.
    Without ``resume`` an existing unit file is recomputed (and overwritten).
    """

    def __init__(self, out: Path, resume: bool, log=None):
        self.dir = Path(out) / "units"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resume = bool(resume)
        self.reused = 0
        self.computed = 0
        self.recomputed_bad = 0
        self.log = log or (lambda *a, **k: None)

    def _path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)
        return self.dir / f"{safe}.json"

    def get(self, key: str, compute: Callable[[], dict]) -> dict:
        path = self._path(key)
        if self.resume and path.exists():
            try:
                value = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as err:
                problem = f"unreadable ({err})"
            else:
                problem = None if isinstance(value, dict) else "not a JSON object"
            if problem is None:
                self.reused += 1
                return value
            # a truncated or garbled unit (a full disk, a copy cut short): never trusted
            self.log(f"note: {path}: {problem}; not trusted, unit {key!r} is recomputed")
            self.recomputed_bad += 1
        value = compute()
        atomic_write_bytes(path, dumps(value))
        self.computed += 1
        return json.loads(path.read_text())  # exactly what a resumed run would read


class ExperimentExistsError(FileExistsError):
    """The output directory holds an earlier run of the experiment (and neither resume nor overwrite was asked)."""


def _module(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"NAME: unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} "
                         "(rdsim reproduce --list)")
    return importlib.import_module(EXPERIMENTS[name])


def list_experiments() -> list[tuple[str, str]]:
    """(name, one-line title) of every experiment."""
    out = []
    for name in EXPERIMENTS:
        try:
            out.append((name, _module(name).TITLE))
        except ImportError as err:  # an experiment whose module is missing is listed as such
            out.append((name, f"(not available: {err})"))
    return out


def run_experiment(name: str, out=None, *, quick: bool = False, resume: bool = False, overwrite: bool = False,
                   log=print) -> dict:
    """Run one experiment into ``out`` (default ``reproduce-NAME/``); returns its summary.

    An ``out`` that already holds a run (a ``summary.json`` or finished units) is continued with
    ``resume=True`` (finished units are reused) or recomputed with ``overwrite=True``; with neither,
    :class:`ExperimentExistsError` is raised rather than overwriting it silently. On resume a
    truncated or garbled unit file is named in a note and recomputed. An ``out`` that cannot be
    written raises ``rdsim._io.OutputDirError`` before any work; one that another process is
    writing into (its ``.rdsim.lock``) raises ``rdsim._io.OutputLockedError`` naming that process.
    """
    from rdsim._io import DirLock, ensure_writable_dir

    mod = _module(name)
    out = Path(out) if out is not None else Path(f"reproduce-{name}")
    if not (resume or overwrite) and ((out / "summary.json").exists() or any((out / "units").glob("*.json"))):
        raise ExperimentExistsError(f"out: {out} already holds a run of {name!r}; pass --resume to continue it "
                                    "(finished units are reused) or --overwrite to start over")
    ensure_writable_dir(out, "--out")
    with DirLock(out, f"rdsim reproduce {name}") as lock:
        if lock.broke_stale:
            log(f"note: {out}/ had a stale lock of process {lock.broke_stale.get('pid')} (no longer running); "
                "taken over")
        return _run_locked(mod, name, out, quick, resume, log)


def _run_locked(mod, name, out, quick, resume, log) -> dict:
    store = Store(out, resume, log)
    t0 = time.perf_counter()
    log(f"rdsim reproduce {name}{' --quick' if quick else ''}: {mod.TITLE}\nclaim: {mod.CLAIM}\n")
    summary = mod.run(out, quick, store, log)
    summary = {"experiment": name, "quick": bool(quick), "claim": mod.CLAIM, **summary,
               "seconds": time.perf_counter() - t0, "units_reused": store.reused, "units_computed": store.computed}
    atomic_write_bytes(out / "summary.json", dumps(summary))
    log(f"\nverdict: {summary.get('verdict')} ({summary.get('verdict_reason', '')})")
    log(f"wrote {out}/summary.json and figures ({summary['seconds']:.0f} s; {store.reused} units reused)")
    return summary
