"""rdsim.torch.lightning.MonitorCallback in a real lightning.Trainer: the callback observes every
optimizer step with the step's batch, so full-batch SGD on least squares gives log|1 - lr alpha_i|
exactly; bad setups are refused. Skipped where lightning is not installed."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from rdsim.torch.lightning import MonitorCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class LinearLS(pl.LightningModule):
    def __init__(self, p, lr, momentum=0.0):
        super().__init__()
        self.net = nn.Linear(p, 1, bias=False)
        self.lr, self.momentum = lr, momentum

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def problem(n=32, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    return X, torch.randn(n, 1, generator=g, dtype=torch.float64)


def trainer(steps, **kw):
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision="64-true", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def loader(X, y):
    ds = torch.utils.data.TensorDataset(X, y)
    return torch.utils.data.DataLoader(ds, batch_size=len(ds), shuffle=False)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_callback_full_batch_sgd_least_squares(momentum):
    X, y = problem()
    lr = 0.2
    cb = MonitorCallback(F.mse_loss, k=None)
    trainer(300, callbacks=[cb]).fit(LinearLS(X.shape[1], lr, momentum), loader(X, y))
    res = cb.monitor.lyapunov(transient=150)
    assert res.status == "ok" and cb.monitor.n_steps == 300
    alpha = np.linalg.eigvalsh(2 * (X.T @ X).numpy() / X.shape[0])
    if momentum == 0.0:
        exact = np.sort(np.log(np.abs(1 - lr * alpha)))[::-1]
        np.testing.assert_allclose(res.exponents, exact, rtol=0, atol=1e-8)
    else:  # heavy ball: det of the step's Jacobian is momentum^N per step
        np.testing.assert_allclose(cb.monitor.lyapunov().exponents.sum(), X.shape[1] * np.log(momentum),
                                   rtol=0, atol=1e-8)


def test_callback_refuses_accumulation_and_clipping_with_tangent():
    X, y = problem()
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer(4, callbacks=[MonitorCallback(F.mse_loss, k=2)], accumulate_grad_batches=2).fit(
            LinearLS(X.shape[1], 0.1), loader(X, y))
    with pytest.raises(ValueError, match="twin"):
        trainer(4, callbacks=[MonitorCallback(F.mse_loss, k=2)], gradient_clip_val=1.0).fit(
            LinearLS(X.shape[1], 0.1), loader(X, y))
    with pytest.raises(TypeError, match="loss_fn"):
        MonitorCallback("mse")
