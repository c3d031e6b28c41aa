"""Two-process CPU DDP fit with the Skeleton callback; every rank writes what it ended with.

Run by tests/test_ddp.py as ``python -m tests.ddp_worker OUT`` from the repository root. Lightning's
subprocess launcher re-runs this same command for rank 1 (LOCAL_RANK=1 in its environment), so the two
processes share nothing but the gloo process group. Each rank writes:

  OUT/rank{r}.safetensors  the whole module state after pruning (backbone.* included), prefixed "model.";
                           the reduced scores the callback pruned by, prefixed "scores."; and the scores this
                           rank computes alone on its own shard, without any reduction, prefixed "local."
  OUT/rank{r}.json         widths, rate, search curve, evaluations, kept indices, how the loaders looked
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("WANDB_MODE", "offline")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import skeleton.pipeline  # noqa: E402
from skeleton.callback import SkeletonCallback  # noqa: E402
from skeleton.localize import Scores, score_neurons  # noqa: E402
from skeleton.train import skeleton_config  # noqa: E402
from tests.helpers import compose_config  # noqa: E402

WORLD = 2
# psi=100: any drop is allowed, so the search walks to max_rate and half the FFN neurons go; which half is
# decided by the scores alone. The SST-2 fixture has 8 training examples: 3 are held out for the search,
# the other 5 are the attribution sample, which eval_batch_size=2 splits into 3 batches: rank 0 scores
# batches 0 and 2 (3 rows), rank 1 batch 1 (2 rows), so the reduction changes the ranking.
OVERRIDES = [
    "task=sst2",
    "skeleton.psi=100",
    "skeleton.search.granularity=0.25",
    "skeleton.search.max_rate=0.5",
    "skeleton.attribution.max_instances=8",
    "data.search_size=3",
    "data.batch_size=4",
    "data.eval_batch_size=2",
    "trainer.max_steps=2",
]


class RecordingCallback(SkeletonCallback):
    """The real callback, plus what this rank would score alone (its shard, no all-reduce)."""

    local: Scores | None = None

    def run(self, trainer, model, datamodule):
        world, rank = trainer.world_size, trainer.global_rank
        shard = itertools.islice(datamodule.attribution_dataloader(), rank, None, world)
        opts = self.config.attribution
        self.local = score_neurons(
            model,
            shard,
            max_instances=-(-opts.max_instances // world),
            seed=model.hparams.seed,
            criterion=opts.criterion,
            target=opts.target,
            token_agg=opts.token_agg,
            magnitude=opts.magnitude,
            unsupervised=opts.unsupervised,
            include_prompt=opts.include_prompt,
            heads=opts.heads,
        )
        # the real scoring is iterative: record each (reduced) pass; the first one is unmasked
        real, self.passes = skeleton.pipeline.score_neurons, []

        def recording(*args, **kwargs):
            self.passes.append(real(*args, **kwargs))
            return self.passes[-1]

        skeleton.pipeline.score_neurons = recording
        try:
            return super().run(trainer, model, datamodule)
        finally:
            skeleton.pipeline.score_neurons = real


def main(out: Path) -> None:
    torch.set_num_threads(1)
    cfg = compose_config(OVERRIDES, run_dir=out / "run")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.module)
    callback = RecordingCallback(skeleton_config(cfg))
    trainer = instantiate(
        cfg.trainer,
        devices=WORLD,
        num_nodes=1,
        strategy=DDPStrategy(process_group_backend="gloo"),
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(out / "run"),
    )
    trainer.fit(model, datamodule=datamodule)

    rank, result = trainer.global_rank, callback.result
    if result is None:
        raise RuntimeError(f"rank {rank}: the Skeleton callback did not run")
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"scores.{k}": v for k, v in result.scores.state().items()})
    tensors.update({f"local.{k}": v for k, v in callback.local.state().items()})
    tensors.update({f"first.{k}": v for k, v in callback.passes[0].state().items()})
    save_file(tensors, str(out / f"rank{rank}.safetensors"))

    search = datamodule.search_dataloader()  # what the callback evaluates the search on
    report = {
        "rank": rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "rate": result.rate,
        "curve": result.outcome.curve,
        "dense": asdict(result.dense),
        "pruned": asdict(result.outcome.pruned),
        "widths_before": result.outcome.ffn.total_per_layer,
        "widths_after": result.outcome.ffn.kept_per_layer,
        "keep_ffn": [sorted(torch.as_tensor(k).tolist()) for k in result.keep_ffn],
        "num_instances": result.scores.num_instances,
        "local_num_instances": callback.local.num_instances,
        "passes": len(callback.passes),
        "attribution_batch_sizes": [len(b["labels"]) for b in datamodule.attribution_dataloader()],
        "attribution_size": len(datamodule.attribution_dataloader().dataset),
        "search_sampler": type(search.sampler).__name__,
        "search_size": len(search.dataset),
        "search_split_size": len(datamodule.search_indices),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
