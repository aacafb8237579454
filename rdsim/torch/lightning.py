"""A PyTorch Lightning callback around :class:`rdsim.torch.TrainingMonitor`.

``import rdsim.torch.lightning`` needs the ``lightning`` package (``pip install lightning``; it
installs beside torch without replacing it); ``import rdsim.torch`` alone never loads it::

    from rdsim.torch.lightning import MonitorCallback
    cb = MonitorCallback(torch.nn.functional.cross_entropy, k=8, every=200, measures=("sharpness",))
    lightning.Trainer(max_epochs=10, callbacks=[cb]).fit(module, loader)
    print(cb.monitor.lyapunov())

The callback builds the monitor when training starts (the optimizer exists then), keeps the batch
of each training step and calls :meth:`TrainingMonitor.observe` from ``on_before_optimizer_step``,
i.e. after the backward pass and before ``optimizer.step()`` updates the parameters, as the
monitor requires. Automatic optimisation with one optimizer; ``accumulate_grad_batches > 1`` is
refused (the step is then not one minibatch's map), and so is gradient clipping with
``method="tangent"`` (the clipped step is a different map: use ``method="twin"`` with a
``step_fn`` that clips).
"""

from __future__ import annotations

from typing import Any, Callable

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - exercised only where lightning is absent
    raise ImportError("rdsim.torch.lightning needs the 'lightning' package: pip install lightning "
                      "(it keeps the installed torch)") from err

from ._monitor import TrainingMonitor

__all__ = ["MonitorCallback"]


def _default_batch_fn(batch) -> tuple[Any, Any]:
    if isinstance(batch, dict):
        raise TypeError("batch_fn: the training batches are dicts; pass batch_fn=lambda batch: (inputs, targets)")
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"batch_fn: expected training batches (inputs, targets, ...), got {type(batch).__name__}; "
                        "pass batch_fn=lambda batch: (inputs, targets)")
    return batch[0], batch[1]


class MonitorCallback(pl.Callback):
    """Observe every training step of a Lightning run with a :class:`rdsim.torch.TrainingMonitor`.

    Args:
        loss_fn: ``loss_fn(model(inputs), targets)`` -> the step's mean loss, the loss
            ``training_step`` minimises.
        model: the module the optimizer trains (default: the LightningModule itself, whose
            ``forward`` must map inputs to the outputs ``loss_fn`` takes).
        batch_fn: maps a training batch to ``(inputs, targets)`` (default: its first two items).
        **monitor_options: passed to :class:`TrainingMonitor` (k, method, every, measures, seed,
            data, qr_every, writer, ...).

    Attributes:
        monitor: the :class:`TrainingMonitor` (None before training starts); after ``fit``,
            ``callback.monitor.lyapunov()`` and ``callback.monitor.records``.
    """

    def __init__(self, loss_fn: Callable, *, model=None, batch_fn: Callable | None = None, **monitor_options):
        super().__init__()
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a function loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        if batch_fn is not None and not callable(batch_fn):
            raise TypeError(f"batch_fn: expected a function batch -> (inputs, targets), got {type(batch_fn).__name__}")
        self.loss_fn, self.model, self.batch_fn = loss_fn, model, batch_fn or _default_batch_fn
        self.monitor_options = monitor_options
        self.monitor: TrainingMonitor | None = None
        self._batch = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("MonitorCallback: needs automatic optimisation (manual optimisation: call "
                             "TrainingMonitor.observe yourself before optimizer.step())")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"MonitorCallback: expected one optimizer, the trainer has {len(trainer.optimizers)}")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("MonitorCallback: accumulate_grad_batches > 1 makes a step span several minibatches; "
                             "the monitor observes one minibatch per step")
        method = self.monitor_options.get("method", "tangent")
        if method == "tangent" and trainer.gradient_clip_val:
            raise ValueError("MonitorCallback: gradient clipping changes the step, so method='tangent' would "
                             "differentiate a different map; use method='twin' with a step_fn that clips")
        if self.monitor is None:
            self.monitor = TrainingMonitor(self.model if self.model is not None else pl_module, self.loss_fn,
                                           trainer.optimizers[0], **self.monitor_options)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._batch is None:
            raise RuntimeError("MonitorCallback: no training batch seen before the optimizer step")
        inputs, targets = self.batch_fn(self._batch)
        self.monitor.observe(inputs, targets)
        self._batch = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.monitor is not None and self.monitor._writer is not None and hasattr(self.monitor._writer, "flush"):
            self.monitor._writer.flush()
