"""Progress that reads well both in a terminal (a Rich bar) and in a log file (one line every N steps),
and a console without Lightning's advertisements."""

from __future__ import annotations

import logging
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

log = logging.getLogger(__name__)
WARNING = "WARNING: "  # the pipeline's prefix for a warning line: logged at WARNING level


class LineProgress(ProgressBar):
    """One line every ``every`` steps with loss, speed and ETA: readable in CI, SLURM and nohup logs."""

    def __init__(self, every: int = 50):
        super().__init__()
        self.every = every
        self._enabled = True
        self._started = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._enabled or not trainer.is_global_zero or step % self.every:
            return
        per_step = (time.perf_counter() - self._started) / max(step, 1)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        loss = trainer.callback_metrics.get("train/loss")
        eta = f", eta {per_step * (total - step) / 60:.1f} min" if total and total != float("inf") else ""
        loss_text = f" loss {float(loss):.4f}" if loss is not None else ""
        print(f"step {step}/{total}{loss_text} ({per_step:.2f} s/step{eta})", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        score = trainer.callback_metrics.get("search/score")
        if self._enabled and trainer.is_global_zero and score is not None and not trainer.sanity_checking:
            print(f"step {trainer.global_step}: search-split score {float(score):.4f}", flush=True)


class StepsRichProgressBar(RichProgressBar):
    """A Rich bar whose epoch total stops at ``max_steps``: a run bounded by steps shows (and times)
    the batches it will run, not the whole epoch."""

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        return min(total, steps_left(self.trainer) * self.trainer.accumulate_grad_batches)


def steps_left(trainer) -> int | float:
    return trainer.max_steps - trainer.global_step if trainer.max_steps > 0 else float("inf")


def progress_bar(every: int = 50) -> ProgressBar:
    """A Rich bar in a terminal, plain lines otherwise (a Rich bar prints nothing into a log file)."""
    return StepsRichProgressBar() if sys.stdout.isatty() else LineProgress(every)


def reporter(trainer: L.Trainer | None):
    """Progress lines on rank 0: logged (Hydra's job log sends them to the console and train.log), and
    printed as well only where no logging handler reaches the console (notebooks, plain scripts)."""
    echo = not _logs_reach_console(log)

    def report(message: str) -> None:
        if trainer is None or trainer.is_global_zero:
            if echo:
                print(f"[skeleton] {message}", flush=True)
            if message.startswith(WARNING):
                log.warning(message[len(WARNING) :])
            else:
                log.info(message)

    return report


def _logs_reach_console(logger: logging.Logger) -> bool:
    if not logger.isEnabledFor(logging.INFO):
        return False
    node: logging.Logger | None = logger
    while node is not None:
        for handler in node.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                return True
        node = node.parent if node.propagate else None
    return False


class _NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." advertisements."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet_lightning() -> None:
    """No tips, and each Lightning line once: Lightning's own console handler repeats what the root
    logger (Hydra's job logging) already prints."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())
    if logging.getLogger().handlers:
        top = logging.getLogger("lightning")
        for handler in [h for h in top.handlers if type(h) is logging.StreamHandler]:
            top.removeHandler(handler)
