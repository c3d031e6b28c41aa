"""Recovery: a few more prompt + head steps on the pruned, still frozen backbone, run by a short
``Trainer.fit`` so that it inherits the run's precision, accelerator and devices (and, under DDP, synced
gradients) instead of a second hand-written loop.

The optimizer is the one recovery has always used: AdamW at ``recovery.lr`` on the trained parameters, no
schedule, over the first ``steps`` training batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from skeleton.heads import task_loss
from skeleton.localize.config import RecoveryConfig


class RecoveryModule(L.LightningModule):
    """Trains the wrapped model's prompt and head; the backbone stays frozen."""

    def __init__(self, model: nn.Module, lr: float):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = task_loss(self.model.task.formulation, self.model(batch), batch["labels"])
        self.log("recovery/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)


def trainer_settings(trainer: L.Trainer | None) -> dict[str, Any]:
    """The settings recovery takes over from the run's Trainer (precision, where it runs)."""
    if trainer is None:
        return {"accelerator": "auto", "devices": 1}
    distributed = trainer.world_size > 1
    return {
        "accelerator": "gpu" if trainer.strategy.root_device.type == "cuda" else "cpu",
        "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
        "strategy": "ddp" if distributed else "auto",
        "precision": trainer.precision,
    }


def trainer_recovery(
    data, cfg: RecoveryConfig, trainer: L.Trainer | None = None
) -> Callable[[nn.Module], None]:
    """A ``recover(model)`` for ``run_skeleton``: ``cfg.steps`` steps on ``data.train_dataloader()``."""

    def recover(model: nn.Module) -> None:
        fit = L.Trainer(
            **trainer_settings(trainer),
            max_steps=cfg.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        fit.fit(RecoveryModule(model, cfg.lr), train_dataloaders=data.train_dataloader())
        model.eval()

    return recover
