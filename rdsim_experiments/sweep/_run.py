"""One run of a sweep: train, measure, write ``runs/<run_id>/result.json`` (atomically, last).

:func:`run_one` is a top-level function of plain arguments (the normalised config dict, the grid
point, the run directory) so that a process pool or Ray can ship it. A run is a deterministic
function of (config, grid point): the data split comes from ``data.seed``, the initialisation,
the minibatches and every probe from the grid seed, and torch runs on one thread.
"""

from __future__ import annotations

import io
import json
import math
import time
import traceback
from pathlib import Path

import numpy as np

__all__ = ["run_id", "run_one", "RESULT_NAME", "to_json"]

RESULT_NAME = "result.json"


def run_id(point: dict) -> str:
    """A run's directory name, from its grid point: ``lr0.05-bs16-s0`` (``bsfull`` for the full batch)."""
    return f"lr{float(point['lr'])!r}-bs{point['batch_size']}-s{int(point['seed'])}"


def _clean(v):
    """JSON-ready: numpy scalars and arrays to Python, non-finite floats to None."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    return v


def to_json(obj) -> bytes:
    return (json.dumps(_clean(obj), indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


# --- data, model, loss ---------------------------------------------------------------------------

def _dtype(name):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def build_data(cfg: dict):
    """(train (X, y), test (X, y), info) for the config's data section (CPU tensors)."""
    import models

    d = cfg["data"]
    dt = _dtype(cfg["model"]["dtype"])
    kind = d["kind"]
    if kind == "digits":
        split = models.digits(d["seed"], d["test_fraction"], scale=d["scale"], dtype=dt)
    elif kind == "mnist1d":
        split = models.mnist1d(d["n"], d["seed"], dtype=dt)
    elif kind == "sparse_regression":
        split = models.sparse_regression(d["n_train"] or 100, d["p"], d["sparsity"], noise=d["noise"],
                                         n_test=d["n_test"] or 1000, seed=d["seed"], dtype=dt)
    else:  # teacher
        teacher = {"in_dim": d["in_dim"], "out_dim": d["out_dim"], "width": d["teacher_width"],
                   "depth": d["teacher_depth"], "seed": d["seed"]}
        split = models.teacher_dataset(teacher, d["n_train"] or 500, d["seed"], n_test=d["n_test"] or 1000,
                                       noise=d["noise"], task=d["task"], dtype=dt)
    (X, y), (Xt, yt) = split.train, split.test
    if d["n_train"] is not None:
        if d["n_train"] > len(y):
            raise ValueError(f"data.n_train: {d['n_train']} exceeds the {len(y)} train samples of {kind}")
        X, y = X[:d["n_train"]], y[:d["n_train"]]
    if d["n_test"] is not None:
        if d["n_test"] > len(yt):
            raise ValueError(f"data.n_test: {d['n_test']} exceeds the {len(yt)} test samples of {kind}")
        Xt, yt = Xt[:d["n_test"]], yt[:d["n_test"]]
    classification = not y.is_floating_point()
    if classification:
        n_classes = int(max(int(y.max()), int(yt.max()) if len(yt) else 0) + 1)
        n_classes = max(n_classes, int(split.info.get("n_classes", 0) or 0)) if isinstance(split.info, dict) else n_classes
    else:
        n_classes = None
    return (X, y), (Xt, yt), {"classification": classification, "n_classes": n_classes}


def build_model(cfg: dict, in_dim: int, out_dim: int, seed: int):
    import models

    m = cfg["model"]
    dt = _dtype(m["dtype"])
    if m["kind"] == "mlp":
        return models.MLP(in_dim, out_dim, m["width"], m["depth"], bias=m["bias"], activation=m["activation"],
                          seed=seed, dtype=dt)
    if m["kind"] == "paper_mlp":
        return models.paper_mlp(in_dim, out_dim, seed=seed, dtype=dt)
    return models.DiagonalLinearNetwork(in_dim, m["depth"], init_scale=m["init_scale"], init=m["init"],
                                        seed=seed, dtype=dt)


def cross_entropy(out, t):
    import torch.nn.functional as F

    return F.cross_entropy(out, t)


def half_mse(out, t):
    """(1/2n) sum ||out_i - t_i||^2 (the DLN loss of rdsim.losses.dln for scalar targets)."""
    out = out.reshape(t.shape)
    err = (out - t) ** 2
    return 0.5 * (err.sum() / t.shape[0])


def build_spec(cfg: dict, point: dict):
    from rdsim import optim

    o = cfg["optimizer"]
    lr = float(point["lr"])
    bs = None if point["batch_size"] == "full" else int(point["batch_size"])
    if o["kind"] == "gd":
        return optim.gd(lr)
    if o["kind"] == "sgd":
        return optim.sgd(lr, bs, o["sampling"])
    if o["kind"] == "momentum":
        return optim.momentum(lr, o["beta"], bs, o["sampling"])
    return optim.adam(lr, o["beta1"], o["beta2"], o["eps"], o["weight_decay"], o["decoupled"],
                      batch_size=bs, sampling=o["sampling"])


def _seed(seed: int, tag: int) -> int:
    """An independent integer seed for sub-task ``tag`` of a run."""
    return int(np.random.SeedSequence([int(seed), int(tag)]).generate_state(1)[0])


def _evaluate(model, loss_fn, X, y, classification):
    import torch

    with torch.no_grad():
        out = model(X)
        loss = float(loss_fn(out, y))
        acc = float((out.argmax(-1) == y).double().mean()) if classification else math.nan
    return loss, acc


def _hutchinson_trace(model, loss_fn, X, y, n_probes: int, seed: int) -> float:
    """tr(H) of the full-batch loss by Hutchinson's estimator with Rademacher probes."""
    import torch
    from torch.func import functional_call, grad, jvp

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_of(ps):
        return loss_fn(functional_call(model, ps, (X,)), y)

    g = torch.Generator(device="cpu").manual_seed(int(seed))
    total = 0.0
    for _ in range(n_probes):
        v = {n: (torch.randint(0, 2, params[n].shape, generator=g) * 2 - 1).to(params[n])
             for n in names}
        _, hv = jvp(grad(loss_of), (params,), (v,))
        total += float(sum((hv[n] * v[n]).sum() for n in names))
    return total / n_probes


# --- the run --------------------------------------------------------------------------------------

def run_one(cfg: dict, point: dict, run_dir: str, progress: bool = False, position: int | None = None,
            write: bool = True) -> dict:
    """Train and measure one grid point; write ``run_dir/result.json`` and artifacts; return the result.

    ``progress``: a tqdm bar over the run's steps (at line ``position`` of the terminal, for pool
    workers). ``write=False``: nothing is written; the files come back as bytes in the result's
    ``"_files"`` entry, for :func:`store_files` on the driver (Ray workers on other machines).
    Never raises for a diverged run (status "diverged"); an unexpected exception is returned as
    {"status": "error", "message": traceback} and no result file is written (a resumed sweep
    retries the run).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    limiter = _blas_one_thread()
    # everything in a run draws from its own seeded generators; the global ones are seeded too
    # (for any library code that would use them) and given back afterwards
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    torch.manual_seed(_seed(point["seed"], 0))
    np.random.seed(_seed(point["seed"], 0) % 2**32)
    try:
        return _run(cfg, point, Path(run_dir), progress, position, write)
    except Exception:  # noqa: BLE001 - reported, the sweep goes on
        return {"run_id": run_id(point), "point": dict(point), "status": "error",
                "message": traceback.format_exc()}
    finally:
        torch.random.set_rng_state(torch_state)
        np.random.set_state(np_state)
        torch.set_num_threads(threads)
        if limiter is not None:
            limiter.restore_original_limits()


def _blas_one_thread():
    """Limit the BLAS / OpenMP pools already loaded (numpy's OpenBLAS) to one thread, if threadpoolctl is there.

    Two workers on two cores with two spinning BLAS threads each are several times slower than
    one thread each; and one thread everywhere keeps in-process and worker results identical.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return None
    return threadpool_limits(1)


def _run(cfg: dict, point: dict, run_dir: Path, progress: bool, position: int | None, write: bool) -> dict:
    import torch

    from rdsim import __version__
    from rdsim._lyapunov import _seeds, lyapunov_spectrum
    from rdsim._systems import NoiseStream
    from rdsim.torch import OptimizerMap

    t_start = time.perf_counter()
    seed = int(point["seed"])
    rid = run_id(point)
    meas = cfg["measure"]
    (X, y), (Xt, yt), info = build_data(cfg)
    classification = info["classification"]
    if classification:
        out_dim = info["n_classes"]
        loss_fn = cross_entropy
    else:
        out_dim = 1 if y.dim() == 1 else int(y.shape[1])
        loss_fn = half_mse
    model = build_model(cfg, int(X.shape[1]), out_dim, seed)
    device = torch.device(cfg["model"]["device"])
    model = model.to(device)
    X, y, Xt, yt = X.to(device), y.to(device), Xt.to(device), yt.to(device)
    spec = build_spec(cfg, point)
    T = int(cfg["train"]["steps"])

    captured: dict = {}
    ckpts: list = []
    ck_every = meas["checkpoints"]["every"] if meas["checkpoints"] else None

    def take_trained(s, z, system):
        if s == T:
            captured["x"] = z.detach().to(torch.float64).cpu().numpy().copy()
        return None

    def take_ckpt(s, z, system):
        if s <= T:
            ckpts.append((s, z[:system.n_params].detach().to(torch.float64).cpu().numpy().copy()))
        return None

    ui: dict = {"bar": None}

    def tick(s, z, system):
        if ui["bar"] is not None:
            ui["bar"].update(s - ui["bar"].n)
        return None

    record = {"trained": (take_trained, T)}
    if progress:
        lyap_total = T + (meas["lyapunov"]["transient"] + meas["lyapunov"]["steps"] if meas["lyapunov"] else 0)
        record["progress"] = (tick, max(1, lyap_total // 100))
    if ck_every:
        record["ckpt"] = (take_ckpt, ck_every)
    lyap = meas["lyapunov"]
    system = OptimizerMap(model, loss_fn, (X, y), spec, device=device,
                          record=record if lyap is not None else None)
    n_params = system.n_params
    result: dict = {"run_id": rid, "point": dict(point), "n_params": n_params, "steps": T,
                    "n_train": int(len(y)), "n_test": int(len(yt)), "rdsim_version": __version__}
    artifacts: dict = {}
    diverged_at = None
    timing = {}

    # 1. training (with the Lyapunov run continuing the same trajectory when asked for)
    t0 = time.perf_counter()
    lres = None
    total = T + (lyap["transient"] + lyap["steps"] if lyap is not None else 0)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=rid, unit="step", leave=False, position=position)
    try:
        if lyap is not None:
            ui["bar"] = bar
            k = min(lyap["k"], system.tangent_dim)
            lres = lyapunov_spectrum(system, None, lyap["steps"], k=k, transient=T + lyap["transient"],
                                     qr_every=lyap["qr_every"], seed=seed)
            if lres.status != "ok" and lres.diverged_at is not None and lres.diverged_at < T:
                diverged_at = int(lres.diverged_at)
                captured.pop("x", None)
        else:
            _, noise_rng = _seeds(seed)
            noise = NoiseStream(system, noise_rng)
            x = system.initial_state(None)
            for s in range(T + 1):
                if ck_every and s % ck_every == 0:
                    ckpts.append((s, x[:n_params].copy()))
                if s == T:
                    break
                x = system.step(x, noise.take(1)[0])
                if not np.all(np.isfinite(x)):
                    diverged_at = s
                    break
                if bar is not None:
                    bar.update(1)
            if diverged_at is None:
                captured["x"] = x
    finally:
        if bar is not None:
            bar.close()
    timing["train_lyapunov"] = time.perf_counter() - t0
    x_T = captured.get("x")
    if x_T is not None and not np.all(np.isfinite(x_T)):
        x_T = None
        diverged_at = T if diverged_at is None else diverged_at

    # 2. measurements at the trained parameters
    if x_T is not None:
        system.load_into(model, x_T)
        t0 = time.perf_counter()
        if meas["generalization"]:
            tr_loss, tr_acc = _evaluate(model, loss_fn, X, y, classification)
            te_loss, te_acc = _evaluate(model, loss_fn, Xt, yt, classification)
            result.update(train_loss=tr_loss, test_loss=te_loss, train_acc=tr_acc, test_acc=te_acc,
                          acc_gap=tr_acc - te_acc, loss_gap=te_loss - tr_loss)
            if not math.isfinite(tr_loss):
                diverged_at = T
        timing["generalization"] = time.perf_counter() - t0
    if x_T is not None and diverged_at is None:
        if meas["lambda_max"] is not None:
            t0 = time.perf_counter()
            o = meas["lambda_max"]
            result["lambda_max"] = system.sharpness(x_T, n_iter=min(o["n_iter"], n_params),
                                                    seed=_seed(seed, 1) + o["seed"])
            timing["lambda_max"] = time.perf_counter() - t0
        if meas["trace"] is not None:
            t0 = time.perf_counter()
            o = meas["trace"]
            result["trace"] = _hutchinson_trace(model, loss_fn, X, y, o["n_probes"], _seed(seed, 2) + o["seed"])
            timing["trace"] = time.perf_counter() - t0
        if meas["sharpness_dimension"] is not None:
            t0 = time.perf_counter()
            o = meas["sharpness_dimension"]
            from rdsim.torch import sharpness_dimension

            bs = o["batch_size"] or (len(y) if point["batch_size"] == "full" else int(point["batch_size"]))
            sd = sharpness_dimension(model, loss_fn, (X, y), lr=float(point["lr"]), batch_size=bs,
                                     method=o["method"], n_batches=o["n_batches"], seed=_seed(seed, 3) + o["seed"])
            result["sharpness_dimension"] = {
                "value": float(sd.value), "method": sd.method,
                "rds_sharpness": _scalar(getattr(sd, "rds_sharpness", None)),
                "lambda_max": _scalar(getattr(sd, "lambda_max", None)),
                "trace": _scalar(getattr(sd, "trace", None)),
            }
            artifacts["sharpness_lambdas"] = np.asarray(_to_numpy(sd.lambdas), dtype=np.float64)
            timing["sharpness_dimension"] = time.perf_counter() - t0
    if lres is not None:
        result["lyapunov"] = {
            "status": lres.status, "diverged_at": lres.diverged_at, "k": int(len(lres.exponents)),
            "exponents": lres.exponents, "stderr": lres.stderr, "dimension": float(lres.dimension),
            "dimension_lower_bound": bool(lres.dimension_is_lower_bound), "n_steps": lres.n_steps,
            "transient": T + lyap["transient"],
        }
        if lres.status == "ok":
            artifacts["spectrum"] = {"exponents": lres.exponents, "stderr": lres.stderr,
                                     "history": lres.history, "history_steps": lres.history_steps,
                                     "block_means": lres.block_means
                                     if lres.block_means is not None else np.empty((0, 0))}
    if diverged_at is not None:  # no checkpoint from after a divergence
        ckpts = [(s, p) for s, p in ckpts if s <= diverged_at and np.all(np.isfinite(p))]
    if ckpts:
        artifacts["checkpoints"] = {"steps": np.array([s for s, _ in ckpts], dtype=np.int64),
                                    "params": np.stack([p for _, p in ckpts])}
    if x_T is not None and diverged_at is None:
        artifacts["trained"] = {"params": x_T[:n_params]}

    result["status"] = "ok" if diverged_at is None else "diverged"
    result["diverged_at"] = diverged_at
    timing["total"] = time.perf_counter() - t_start
    result["seconds"] = timing

    # 3. artifacts first, the result file last (its presence marks the run done)
    files: dict = {}
    for name, arr in artifacts.items():
        buf = io.BytesIO()
        if isinstance(arr, dict):
            np.savez(buf, **arr)
        else:
            np.savez(buf, values=arr)
        files[f"{name}.npz"] = buf.getvalue()
    result["artifacts"] = sorted(files)
    files[RESULT_NAME] = to_json(result)
    out = json.loads(files[RESULT_NAME])
    if write:
        store_files(run_dir, files)
    else:
        out["_files"] = files
    return out


def store_files(run_dir, files: dict) -> None:
    """Write a run's files atomically, ``result.json`` last."""
    from rdsim._io import atomic_write_bytes

    run_dir = Path(run_dir)
    for name in sorted(files, key=lambda n: n == RESULT_NAME):
        atomic_write_bytes(run_dir / name, files[name])


def _to_numpy(v):
    try:
        import torch

        if isinstance(v, torch.Tensor):
            return v.detach().to(torch.float64).cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(v, dtype=np.float64)


def _scalar(v):
    if v is None:
        return None
    try:
        arr = _to_numpy(v).ravel()
    except (TypeError, ValueError):
        return None
    return float(arr[0]) if arr.size else None


# --- checks before the first run ------------------------------------------------------------------

#: a grid with more runs than this prints its size and the work it stands for before starting
LARGE_GRID = 500


def check_before_runs(config, executor: str = "local", address: str | None = None, stream=None) -> dict:
    """Check what only the data, the model and the machine can tell, before any run starts.

    Raises :class:`SweepConfigError` naming the key (and its line) for: ``model.device = "cuda"``
    on a machine without CUDA (or a missing device index; not checked for a Ray cluster given by
    ``address``, whose nodes may have GPUs this machine lacks); ``data.n_train`` / ``data.n_test``
    larger than the data set; a batch size larger than the train set; ``measure.lyapunov.k`` (or
    ``measure.sharpness_dimension.batch_size``) larger than what the training map allows. A grid of
    more than :data:`LARGE_GRID` runs prints its size and work to ``stream`` (stderr). Returns
    {"n_train", "n_params", "dimension", "n_runs"}.
    """
    import sys

    import torch

    from ._config import SweepConfigError, find_line

    cfg = config.data

    def err(path, message):
        return SweepConfigError(message, ".".join(path), find_line(config.text, path), config.source)

    dev = cfg["model"]["device"]
    if dev.startswith("cuda") and not (executor == "ray" and address):
        if not torch.cuda.is_available():
            raise err(("model", "device"), f"{dev!r} asked for, but this machine has no CUDA device "
                      f"(torch {torch.__version__}, cuda {torch.version.cuda}); use \"cpu\"")
        index = torch.device(dev).index
        if index is not None and index >= torch.cuda.device_count():
            raise err(("model", "device"), f"{dev!r}: this machine has {torch.cuda.device_count()} CUDA "
                      f"device(s), numbered from 0")
    try:
        (X, y), (Xt, yt), info = build_data(cfg)
    except ValueError as e:
        msg = str(e)
        for key in ("n_train", "n_test"):
            if msg.startswith(f"data.{key}:"):
                raise err(("data", key), msg.split(":", 1)[1].strip()) from None
        raise err(("data",), f"the data cannot be built: {msg}") from None
    n = int(len(y))
    for bs in cfg["grid"]["batch_size"]:
        if bs != "full" and bs > n:
            raise err(("grid", "batch_size"), f"batch size {bs} exceeds the {n} train samples")
    out_dim = info["n_classes"] if info["classification"] else (1 if y.dim() == 1 else int(y.shape[1]))
    model = build_model(cfg, int(X.shape[1]), out_dim, 0)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    spec = build_spec(cfg, config.points[0])
    dim = n_params * (1 + spec.n_buffers)
    lyap = cfg["measure"]["lyapunov"]
    if lyap is not None and lyap["k"] > dim:
        raise err(("measure", "lyapunov", "k"), f"{lyap['k']} exceeds the dimension of the training map "
                  f"({dim} = {n_params} parameters x {1 + spec.n_buffers} for {cfg['optimizer']['kind']}); "
                  f"at most {dim} exponents exist (k = {dim} is the full spectrum)")
    sd = cfg["measure"]["sharpness_dimension"]
    if sd is not None and sd["batch_size"] is not None and sd["batch_size"] > n:
        raise err(("measure", "sharpness_dimension", "batch_size"),
                  f"{sd['batch_size']} exceeds the {n} train samples")
    n_runs = len(config.points)
    if n_runs > LARGE_GRID:
        g = cfg["grid"]
        steps = cfg["train"]["steps"] + (lyap["transient"] + lyap["steps"] if lyap is not None else 0)
        ck = cfg["measure"]["checkpoints"]
        disk = n_runs * 8 * n_params * ((cfg["train"]["steps"] // ck["every"] + 1) if ck else 0)
        print(f"note: sweep {cfg['sweep']['name']!r} is a large grid: {n_runs} runs (lr {len(g['lr'])} x "
              f"batch_size {len(g['batch_size'])} x seed {len(g['seed'])}), {steps} optimizer steps each "
              f"({n_runs * steps:.3g} in all) on {n_params} parameters"
              + (f", about {disk / 1e6:.0f} MB of checkpoints" if disk else "")
              + "; interrupt at any time and continue with --resume", file=stream or sys.stderr)
    return {"n_train": n, "n_params": n_params, "dimension": dim, "n_runs": n_runs}
