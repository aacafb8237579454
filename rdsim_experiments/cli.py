"""The ``rdsim`` command line: ``rdsim demo`` (the edge-of-stability map), ``rdsim catalogue``,
``rdsim spectrum SYSTEM``, ``rdsim systems``, ``rdsim sweep CONFIG``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _catalogue_runs(quick: bool):
    """(label, factory, n_steps, transient, k) for the catalogue demo."""
    from rdsim import systems as S

    f = 0.25 if quick else 1.0
    return [
        ("henon", S.henon, int(400_000 * f), 1000, None),
        ("logistic r=4", S.logistic, int(400_000 * f), 1000, None),
        ("cat map", S.cat_map, 20_000, 100, None),
        ("standard map K=10", lambda: S.standard_map(10.0), int(400_000 * f), 1000, None),
        ("lorenz", S.lorenz, int(100_000 * f), 2000, None),
        ("lorenz96 N=40 F=8", S.lorenz96, int(20_000 * f), 2000, None),
        ("gaussian products n=4", lambda: S.gaussian_matrix_product(4, 1.0), int(200_000 * f), 0, None),
        ("random fibonacci", S.random_fibonacci, int(400_000 * f), 0, None),
        ("GBM mu=0.5 sigma=0.5", lambda: S.gbm(0.5, 0.5, dt=1e-3), int(2_000_000 * f), 0, None),
        ("noisy pitchfork", lambda: S.noisy_pitchfork(1.0, 1.0, dt=1e-3), int(2_000_000 * f), 10_000, None),
    ]


def _fmt(values, n=3):
    vals = [f"{v:+.4f}" for v in np.asarray(values)[:n]]
    if len(values) > n:
        vals.append(f"... ({len(values)})")
    return " ".join(vals)


def catalogue(out: Path, quick: bool = False) -> list[dict]:
    """Lyapunov spectra of the catalogue against their reference values; table, CSV and figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdsim._io import atomic_savefig, atomic_write_csv
    from rdsim._lyapunov import lyapunov_spectrum

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        print(f"note: {out}/ exists; its demo files will be replaced")
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    header = f"{'system':24s} {'dim':>4s} {'steps':>9s}  {'exponents (per unit time)':38s} {'D_KY':>7s}  {'reference':30s} {'time':>6s}"
    print("rdsim demo: Lyapunov spectra of the catalogue (QR method, numba engine)\n")
    print(header)
    print("-" * len(header))
    for label, factory, n_steps, transient, k in _catalogue_runs(quick):
        t0 = time.perf_counter()
        system = factory()
        res = lyapunov_spectrum(system, None, n_steps, k=k, transient=transient, seed=0)
        elapsed = time.perf_counter() - t0
        ref = getattr(system, "reference", {})
        ref_exps = ref.get("exponents")
        if ref_exps is not None:
            ref_txt = _fmt(ref_exps)
        elif "n_positive" in ref:
            ref_txt = f"{ref['n_positive']} positive, sum {ref['sum']:g}"
        elif "sum" in ref:
            ref_txt = f"sum {ref['sum']:+.4f}"
        else:
            ref_txt = ""
        print(f"{label:24s} {system.dim:4d} {n_steps:9d}  {_fmt(res.exponents):38s} {float(res.dimension):7.4f}  {ref_txt:30s} {elapsed:5.1f}s")
        z = None
        if ref_exps is not None:
            m = min(len(ref_exps), len(res.exponents))
            dev = np.abs(res.exponents[:m] - np.asarray(ref_exps[:m]))
            z = float(np.max(dev / np.maximum(res.stderr[:m], 1e-300)))
        rows.append({
            "system": label, "dim": system.dim, "n_steps": n_steps, "transient": transient, "status": res.status,
            "lambda_1": res.exponents[0], "stderr_1": res.stderr[0],
            "lambda_d": res.exponents[-1], "sum": float(res.exponents.sum()),
            "kaplan_yorke": float(res.dimension),
            "n_positive": int(np.sum(res.exponents > 2 * res.stderr)),
            "n_zero": int(np.sum(np.abs(res.exponents) <= 2 * res.stderr)),
            "reference": ref_txt, "ref_sum": ref.get("sum", ""),
            "max_dev_in_stderr": "" if z is None else z, "seconds": round(elapsed, 3),
        })
        results[label] = (system, res)

    atomic_write_csv(out / "results.csv", rows)

    # figure 1: convergence of the running estimates to the reference values (log-log)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, label in zip(axes.flat, ["henon", "lorenz", "gaussian products n=4", "GBM mu=0.5 sigma=0.5"]):
        system, res = results[label]
        ref = np.asarray(getattr(system, "reference", {}).get("exponents"))
        steps = res.history_steps
        for j in range(res.history.shape[1]):
            dev = np.abs(res.history[:, j] - ref[j])
            ax.loglog(steps, np.maximum(dev, 1e-12), lw=1.2, label=f"$|\\lambda_{j + 1}(T) - \\lambda_{j + 1}^{{ref}}|$")
        guide = res.stderr.max() * np.sqrt(steps[-1] / steps)
        ax.loglog(steps, guide, "k--", lw=0.8, label="$\\propto T^{-1/2}$ (final stderr)")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("accumulated steps T")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Running Lyapunov estimates converge to the reference values")
    fig.tight_layout()
    atomic_savefig(fig, out / "convergence.png", dpi=110)
    plt.close(fig)

    # figure 2: the Lorenz-96 spectrum with error bars and its Kaplan-Yorke dimension
    system, res = results["lorenz96 N=40 F=8"]
    fig, ax = plt.subplots(figsize=(8, 4))
    idx = np.arange(1, len(res.exponents) + 1)
    ax.errorbar(idx, res.exponents, yerr=2 * res.stderr, fmt="o", ms=3)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("index i")
    ax.set_ylabel("$\\lambda_i$ (per unit time)")
    pos = int(np.sum(res.exponents > 2 * res.stderr))
    zero = int(np.sum(np.abs(res.exponents) <= 2 * res.stderr))
    ax.set_title(f"Lorenz-96 (N=40, F=8): {pos} positive, {zero} zero within 2 s.e., "
                 f"sum {res.exponents.sum():.3f}, D_KY = {float(res.dimension):.2f}")
    fig.tight_layout()
    atomic_savefig(fig, out / "lorenz96_spectrum.png", dpi=110)
    plt.close(fig)
    print(f"\nwrote {out / 'results.csv'}, {out / 'convergence.png'}, {out / 'lorenz96_spectrum.png'}")
    return rows


def _spectrum(args) -> int:
    from rdsim import systems as S
    from rdsim._lyapunov import lyapunov_spectrum

    if args.system not in S.CATALOGUE:
        print(f"error: unknown system {args.system!r}; choose from {', '.join(sorted(S.CATALOGUE))}", file=sys.stderr)
        return 2
    system = S.CATALOGUE[args.system]()
    res = lyapunov_spectrum(system, None, args.steps, k=args.k, transient=args.transient, seed=args.seed,
                            qr_every=args.qr_every, progress=not args.no_progress)
    print(res)
    print(f"reference: {getattr(system, 'reference', {})}")
    return 0 if res.status == "ok" else 1


def _list_systems(_args) -> int:
    from rdsim import systems as S

    for name, factory in S.CATALOGUE.items():
        doc = (factory.__doc__ or "").strip().splitlines()
        system = factory()
        print(f"{name:24s} dim={system.dim:<3d} {doc[0] if doc else ''}  reference: {getattr(system, 'reference', {})}")
    return 0


def _sweep(args) -> int:
    from rdsim_experiments.sweep import EXAMPLE_CONFIG, SweepExistsError, run_sweep

    if args.example:
        print(EXAMPLE_CONFIG, end="")
        return 0
    if args.config is None:
        print("error: rdsim sweep: give a CONFIG.toml (or --example to print one)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(Path(args.config).stem + "-sweep")
    try:
        res = run_sweep(args.config, out, resume=args.resume, executor=args.executor, workers=args.workers,
                        address=args.address, progress=not args.no_progress)
    except SweepExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if res.ok else 1


def _reproduce(args) -> int:
    from rdsim_experiments.reproduce import list_experiments, run_experiment

    if args.list or args.name is None:
        for name, title in list_experiments():
            print(f"{name:20s} {title}")
        return 0 if args.list else 2
    from rdsim_experiments.reproduce import ExperimentExistsError

    try:
        run_experiment(args.name, args.out, quick=args.quick, resume=args.resume, overwrite=args.overwrite)
    except ExperimentExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rdsim", description="Optimizers as random dynamical systems.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the edge-of-stability map: GD and SGD on a diagonal linear network and an MLP "
                       "across the stability threshold (Lyapunov exponents, D_KY, SD, sharpness, generalization gap)")
    p.add_argument("--out", default="rdsim-demo", help="output directory (default: rdsim-demo/)")
    p.add_argument("--quick", action="store_true", help="a few runs only (~30 s)")
    p = sub.add_parser("catalogue", help="Lyapunov spectra of the catalogue systems against reference values")
    p.add_argument("--out", default="rdsim-catalogue", help="output directory (default: rdsim-catalogue/)")
    p.add_argument("--quick", action="store_true", help="shorter runs")
    p = sub.add_parser("spectrum", help="Lyapunov spectrum of a catalogue system")
    p.add_argument("system")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--transient", type=int, default=1000)
    p.add_argument("--qr-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    sub.add_parser("systems", help="list the catalogue")
    p = sub.add_parser("sweep", help="a resumable learning-rate x batch-size (x seed) sweep from a TOML config")
    p.add_argument("config", nargs="?", help="the sweep configuration (TOML); see --example")
    p.add_argument("--example", action="store_true", help="print a small runnable configuration and exit")
    p.add_argument("--out", default=None, help="output directory (default: <config name>-sweep/)")
    p.add_argument("--resume", action="store_true", help="continue a sweep in --out, skipping finished runs")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: a process pool (default); ray: Ray tasks (pip install 'rdsim[distributed]')")
    p.add_argument("--workers", type=int, default=1, help="parallel runs (local: processes; ray: CPUs of a "
                   "local Ray instance); default 1 (in-process for local)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance); the "
                   "cluster's nodes need rdsim installed, results come back to this machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser("reproduce", help="reproduce a paper's finding (rdsim reproduce --list)")
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--quick", action="store_true", help="the CI-sized version")
    p.add_argument("--out", default=None, help="output directory (default: reproduce-NAME/)")
    p.add_argument("--resume", action="store_true", help="skip the units a previous (killed) run finished")
    p.add_argument("--overwrite", action="store_true", help="recompute everything in an --out that holds a run")
    args = parser.parse_args(argv)
    from rdsim._io import OutputDirError, OutputLockedError

    try:
        if args.command == "demo":
            from rdsim_experiments.demo import eos_map

            eos_map(Path(args.out), quick=args.quick)
            return 0
        if args.command == "catalogue":
            catalogue(Path(args.out), quick=args.quick)
            return 0
        if args.command == "spectrum":
            return _spectrum(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "reproduce":
            return _reproduce(args)
        return _list_systems(args)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OutputDirError, OutputLockedError) as err:  # unwritable --out, or another process writing there
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
