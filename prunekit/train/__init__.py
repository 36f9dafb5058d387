"""Training loop: SGD with a cosine/step schedule, checkpoints and exact resume, torchrun DDP,
distillation, and hooks that pruning methods plug into.

>>> from prunekit.train import TrainConfig, Hooks, fit, evaluate
>>> result = fit(model, train, TrainConfig(epochs=30), test_set=test,
...              checkpoint_path="runs/base.state.pt")          # doctest: +SKIP
>>> result.test_acc, evaluate(model, test)                      # doctest: +SKIP
(93.4, 93.4)
"""

from __future__ import annotations

from .config import Hooks, TrainConfig, TrainResult
from .loop import epoch_steps, evaluate, fit
from .losses import distillation_loss

__all__ = ["Hooks", "TrainConfig", "TrainResult", "distillation_loss", "epoch_steps", "evaluate",
           "fit"]
