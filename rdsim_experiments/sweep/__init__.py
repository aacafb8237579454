"""Declarative, resumable sweeps: ``rdsim sweep CONFIG.toml`` (learning rate x batch size x seed).

Each grid point trains a network with an rdsim optimizer map, measures it (train/test loss and
accuracy, generalization gaps, lambda_max(H), tr(H), sharpness dimension, Lyapunov spectrum,
checkpoints) and writes ``runs/<run_id>/result.json`` atomically; the sweep writes one tidy
``results.csv`` (one row per run, sorted by lr, batch size, seed) and ``correlations.csv``
(Kendall tau and granulated Kendall coefficients of each complexity measure against the gaps,
:mod:`rdsim.stats`). Executors: a local spawn process pool, or Ray. ``rdsim sweep --example``
prints a runnable config (:data:`EXAMPLE_CONFIG`).

Configuration (TOML; unknown keys, wrong types and empty grids raise :class:`SweepConfigError`,
a ValueError naming the key and its line):

* ``[sweep]`` name, description.
* ``[model]`` kind = "mlp" (width, depth, activation, bias) | "paper_mlp" | "dln" (depth,
  init_scale, init); dtype "float64" | "float32"; device "cpu" | "cuda[:i]" (num_gpus per Ray task).
* ``[data]`` kind = "digits" (scale, test_fraction) | "mnist1d" (n) | "sparse_regression" (p,
  sparsity, noise) | "teacher" (in_dim, out_dim, teacher_width, teacher_depth, task, noise);
  n_train / n_test (the first samples of each split), seed (of the data only).
* ``[optimizer]`` kind = "gd" | "sgd" | "momentum" | "adam" and its fixed hyperparameters
  (sampling, beta, beta1, beta2, eps, weight_decay, decoupled).
* ``[grid]`` lr = [...] (required), batch_size = [... or "full"], seed = [...] (default [0]).
* ``[train]`` steps: optimizer steps from the seeded initialisation; every measurement below is
  taken at the parameters after these steps.
* ``[measure]`` generalization = true (train/test loss and accuracy, acc_gap = train - test
  accuracy, loss_gap = test - train loss); tables ``[measure.lambda_max]`` (n_iter),
  ``[measure.trace]`` (n_probes, Hutchinson), ``[measure.sharpness_dimension]`` (method, n_batches,
  batch_size: default the run's), ``[measure.lyapunov]`` (k, transient, steps, qr_every: the
  training trajectory continues for transient + steps steps after training, the top-k exponents
  are accumulated over the last ``steps``), ``[measure.checkpoints]`` (every). A table turns its
  measurement on (``name = true`` with the defaults, ``false`` off).

Determinism: a run depends only on (config, grid point): the grid seed seeds the initialisation,
the minibatches (the same sequence whether or not the Lyapunov run is on, so the same trained
parameters up to rounding), the probes and the tangent block; torch and BLAS use one thread. So ``kill -9`` plus ``--resume`` reproduces the
uninterrupted ``results.csv`` byte for byte, with any executor or number of workers.
"""

from ._config import EXAMPLE_CONFIG, SweepConfig, SweepConfigError, find_line, load_config, parse_config
from ._run import run_id, run_one
from ._runner import (COMPLEXITY_MEASURES, GAP_TARGETS, SweepExistsError, SweepResult, correlation_table,
                      format_correlations, results_table, run_sweep)

__all__ = [
    "COMPLEXITY_MEASURES",
    "EXAMPLE_CONFIG",
    "GAP_TARGETS",
    "SweepConfig",
    "SweepConfigError",
    "SweepExistsError",
    "SweepResult",
    "correlation_table",
    "find_line",
    "format_correlations",
    "load_config",
    "parse_config",
    "results_table",
    "run_id",
    "run_one",
    "run_sweep",
]
