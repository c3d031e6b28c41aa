"""Soft prompt tuning of a frozen backbone: the LightningModule at the centre of Skeleton.

Only the soft prompt (and a small task head) train. The prompt tokens are prepended to the
input embeddings, so the backbone sees ``[P_1..P_n, CLS, tokens..., SEP]`` with an attention
mask and positions that cover them. Pooling reads real tokens, never soft ones.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import lightning as L
import torch
from torch import nn
from transformers import get_scheduler

from skeleton.backbones import freeze, load_backbone, load_tokenizer, set_dropout, weights_hash
from skeleton.deep_prompt import DeepPrompt, check_config, optimizer_groups
from skeleton.heads import TaskHead, task_loss
from skeleton.localize.arch import adopt_adapter, model_type_of
from skeleton.tasks import get_task
from skeleton.verbalizer import check_head, insert_suffix, is_causal

POOLINGS = ("auto", "mean", "first", "last", "prompt")
TRAINED = ("prompt.", "head.")  # state-dict prefixes of what prompt tuning trains; the backbone never is


class TrainedStateError(ValueError):
    """A saved prompt + head that does not fit this model (another backbone size, task or prompt length)."""


PROMPT_INITS = ("random", "vocab", "text", "peft")


@dataclass
class PromptConfig:
    """How the soft prompt is shaped and initialised (kept apart from the model, as PEFT does)."""

    num_tokens: int | None = 20  # None only with init=peft: the adapter's number of tokens
    init: str = "vocab"  # random | vocab (embeddings of sampled vocabulary tokens) | text | peft
    init_text: str | None = None
    lr: float = 3e-2
    path: str | None = None  # init=peft: a PEFT prompt-tuning adapter folder (skeleton.peft_interop)
    deep: bool = False  # also vectors at every later layer's input (skeleton.deep_prompt)
    reparam: int = 0  # deep only: hidden width of the MLP that trains them, folded away after training
    reparam_lr: float = 1e-4  # that MLP's learning rate

    def __post_init__(self):
        check_config(self)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"prompt.init={self.init!r} is unknown; choose one of {', '.join(PROMPT_INITS)}")
        if self.init == "text" and not self.init_text:
            raise ValueError(
                "prompt.init=text needs prompt.init_text='...' (the words to start the prompt from)"
            )
        if self.init == "peft":
            self._from_peft()
        if self.num_tokens is None or self.num_tokens < 1:
            raise ValueError(f"prompt.num_tokens must be >= 1, got {self.num_tokens}")

    def _from_peft(self) -> None:
        from skeleton.peft_interop import adapter_num_tokens

        if not self.path:
            raise ValueError("prompt.init=peft needs prompt.path=FOLDER (a PEFT prompt-tuning adapter)")
        if self.num_tokens is None:
            self.num_tokens = adapter_num_tokens(self.path)


class SoftPrompt(nn.Module):
    """``num_tokens`` trainable input embeddings shared by every example."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().clone())

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeddings.unsqueeze(0).expand(batch_size, -1, -1)

    @classmethod
    def initialise(cls, cfg: PromptConfig, word_embeddings: nn.Embedding, tokenizer=None, seed: int = 0):
        """Vocabulary init (Lester et al. 2021) starts inside the embedding manifold and trains faster."""
        weight = word_embeddings.weight.detach()
        gen = torch.Generator().manual_seed(seed)
        if cfg.init == "peft":  # a prompt someone already tuned with PEFT
            from skeleton.peft_interop import load_peft_prompt

            return cls(load_peft_prompt(cfg.path, hidden_size=weight.shape[1], num_tokens=cfg.num_tokens))
        if cfg.init == "random":
            std = weight.std().item()
            return cls(torch.randn(cfg.num_tokens, weight.shape[1], generator=gen) * std)
        if cfg.init == "vocab":
            ids = torch.randint(min(5000, weight.shape[0]), (cfg.num_tokens,), generator=gen)
            return cls(weight[ids])
        ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
        ids = (ids * (cfg.num_tokens // max(len(ids), 1) + 1))[: cfg.num_tokens]
        return cls(weight[torch.tensor(ids)])


class PromptTunedModel(L.LightningModule):
    """Frozen backbone + soft prompt + task head.

    ``pooling``: ``mean`` over real tokens (default: all-MiniLM-L6-v2 and other sentence encoders
    were trained for mean pooling, and a mean is robust when the prompt shifts the [CLS] position);
    ``first`` reads the real first token ([CLS], right after the prompt); ``last`` the last real
    token (decoder families); ``prompt`` the mean of the soft-prompt outputs; ``auto`` is ``last`` for
    decoder-only families and ``first`` otherwise (``hparams.pooling`` records the resolved one).

    ``head``: ``linear`` (a small trained head on the pooled output) or ``verbalizer`` (the LM's own
    log-probabilities of label words, ``skeleton.verbalizer``; ``verbalizer`` holds its settings).
    """

    def __init__(
        self,
        backbone: str,
        task: str,
        prompt: PromptConfig | dict | None = None,
        pooling: str = "mean",
        backbone_dropout: float = 0.0,
        head_hidden: int = 0,
        head_dropout: float = 0.0,
        head_lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        scheduler: str = "linear",
        seed: int = 0,
        backbone_module: nn.Module | None = None,
        adapter: str | None = None,
        head: str = "linear",
        verbalizer: dict | None = None,
    ):
        """``backbone`` names the weights (hub name, folder, ``demo``, ``tiny:<family>``); pass an
        already built ``backbone_module`` (e.g. a pruned export) to skip loading by name. ``adapter``
        names the localization adapter (``package.module:function``, ``registered`` or ``inferred``;
        None = registered, else inferred); ``hparams.adapter`` records the one used, so artifacts
        rebuild with it."""
        super().__init__()
        prompt_cfg = prompt if isinstance(prompt, PromptConfig) else PromptConfig(**(prompt or {}))
        self.save_hyperparameters(ignore=["prompt", "backbone_module", "verbalizer"])
        self.hparams["prompt"] = asdict(prompt_cfg)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is unknown; choose one of {', '.join(POOLINGS)}")
        self.task = get_task(task)
        verbalizer_cfg = check_head(head, verbalizer, self.task, head_hidden)
        self.prompt_cfg = prompt_cfg
        self.backbone_name = backbone
        self.verbalizer, self.hparams["verbalizer"] = None, None  # plain values only: checkpoints hold them
        if verbalizer_cfg is not None:  # the backbone comes with its LM head; the head reads it
            from skeleton.verbalizer import build

            built = build(backbone, self.task, verbalizer_cfg, backbone=backbone_module, seed=seed)
            self.hparams["verbalizer"] = verbalizer_cfg.to_dict()  # resolved: words and template as used
            self.backbone, self.lm_output, self.verbalizer = built.backbone, built.output, built.tokens
            self.register_buffer(
                "_suffix", torch.tensor(built.tokens.suffix, dtype=torch.long), persistent=False
            )
        elif backbone_module is not None:
            self.backbone = backbone_module
        else:
            self.backbone = load_backbone(backbone, seed=seed)
        self._causal = is_causal(model_type_of(self.backbone))
        self._positions = (
            self._causal and "position_ids" in inspect.signature(self.backbone.forward).parameters
        )
        if pooling == "auto":
            self.hparams["pooling"] = "last" if self._causal else "first"
        self.hparams["adapter"] = adopt_adapter(self.backbone, adapter)
        freeze(self.backbone)
        set_dropout(self.backbone, backbone_dropout)
        self.backbone_dropout = backbone_dropout
        tokenizer = load_tokenizer(backbone) if prompt_cfg.init == "text" else None
        self.prompt = SoftPrompt.initialise(prompt_cfg, self.backbone.get_input_embeddings(), tokenizer, seed)
        if prompt_cfg.deep:  # a child of the prompt: trained, saved and counted as the prompt is
            self.prompt.deep = DeepPrompt.initialise(
                self.backbone, self.prompt.embeddings, prompt_cfg.reparam
            )
        hidden = self.backbone.config.hidden_size
        if self.verbalizer is not None:
            self.head = built.head
        else:
            self.head = TaskHead(
                self.task.formulation, hidden, self.task.num_labels, head_hidden, head_dropout
            )
        self._uses_token_types = getattr(self.backbone.config, "type_vocab_size", 0) > 1
        self.strict_loading = False  # checkpoints hold prompt + head only, never the backbone
        # Logged as search/* (validation: the split that picks the checkpoint and the rate) and dev/* (test)
        self.metrics = {"search": self.task.build_metrics(), "dev": self.task.build_metrics()}

    # ---- the forward pass ------------------------------------------------------------
    @property
    def task_formulation(self) -> str:
        return self.task.formulation

    def prepare(self, batch: dict) -> dict:
        """The batch as the backbone reads it: with the verbalizer's template inserted after the text."""
        if self.verbalizer is None or "predict_at" in batch:
            return batch
        tokens = self.verbalizer
        return insert_suffix(batch, self._suffix, tokens.before_last, tokens.predict_offset)

    def content_mask(self, batch: dict, include_prompt: bool = False) -> torch.Tensor:
        """True where the backbone sees a real token (not padding); soft prompt positions too if asked."""
        mask = self.prepare(batch)["attention_mask"].bool()
        make = mask.new_ones if include_prompt else mask.new_zeros
        prompt = make(mask.shape[0], self.prompt.num_tokens)
        return torch.cat([prompt, mask], dim=1)

    def encode(self, batch: dict) -> torch.Tensor:
        """Backbone hidden states for every row (B*C rows), prompt positions included."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, n = ids.shape[0], self.prompt.num_tokens
        embeds = self.backbone.get_input_embeddings()(ids)
        inputs = torch.cat([self.prompt(rows).to(embeds.dtype), embeds], dim=1)
        full_mask = torch.cat([mask.new_ones(rows, n), mask], dim=1)
        kwargs = {}
        if self._uses_token_types and "token_type_ids" in batch:
            kwargs["token_type_ids"] = torch.cat([mask.new_zeros(rows, n), batch["token_type_ids"]], dim=1)
        if self._positions and bool((mask[:, 1:] > mask[:, :-1]).any()):  # padding before a real token:
            # positions count real tokens only, so a left-padded row reads as a right-padded one
            kwargs["position_ids"] = (full_mask.cumsum(1) - 1).clamp(min=0)
        deep = getattr(self.prompt, "deep", None)
        with deep.applied(self.backbone, n) if deep is not None else nullcontext():
            out = self.backbone(inputs_embeds=inputs, attention_mask=full_mask, **kwargs)
        return out.last_hidden_state

    def pool(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        n = self.prompt.num_tokens
        pooling = self.hparams.pooling
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if "predict_at" in batch:  # the verbalizer reads where the label word is predicted
            return hidden[rows, n + batch["predict_at"]]
        if pooling == "prompt":
            return hidden[:, :n].mean(dim=1)
        mask = batch["attention_mask"].to(hidden.dtype)
        if pooling == "first":  # the first real token, whichever side was padded
            return hidden[rows, n + batch["attention_mask"].argmax(dim=1)]
        if pooling == "last":
            last = mask.shape[1] - 1 - batch["attention_mask"].flip(1).argmax(dim=1)
            return hidden[rows, n + last]
        text = hidden[:, n:]
        return (text * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)

    def forward(self, batch: dict) -> torch.Tensor:
        batch = self.prepare(batch)
        pooled = self.pool(self.encode(batch), batch)
        if self.verbalizer is not None:  # vocabulary log-probabilities from the LM's own output layer
            pooled = torch.log_softmax(self.lm_output(pooled, self.backbone).float(), dim=-1)
        return self.head(pooled, batch.get("num_choices", 1), batch.get("choice_mask"))

    # ---- training ----------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Keep a dropout-free frozen backbone in eval mode: same maths, no dropout overhead."""
        super().train(mode)
        if mode and self.backbone_dropout == 0:
            self.backbone.eval()
        return self

    def on_train_end(self) -> None:
        """Fold a deep prompt's reparameterisation away: from here on only its vectors exist."""
        deep = getattr(self.prompt, "deep", None)
        if deep is not None:
            deep.fold()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = task_loss(self.task.formulation, self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def _eval_step(self, stage: str, batch: dict) -> None:
        logits = self(batch)
        loss = task_loss(self.task.formulation, logits, batch["labels"])
        self.log(f"{stage}/loss", loss, batch_size=batch["labels"].shape[0])
        self.metrics[stage].update(logits.detach().float().cpu(), _cpu(batch))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("search", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("dev", batch)

    def _eval_epoch_end(self, stage: str) -> None:
        scores = self.metrics[stage].compute()
        self.metrics[stage].reset()
        for name, value in scores.items():
            self.log(f"{stage}/{name}", value, sync_dist=True)
        self.log(f"{stage}/score", scores[self.task.headline], prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("search")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("dev")

    # ---- inference -------------------------------------------------------------------------
    def predict(self, inputs, batch_size: int = 64, max_length: int | None = None) -> list[dict]:
        """Predict a string, a tuple of the task's fields (a pair), a dict keyed by the task's field
        names, or a list of them: one ``{"index", "prediction", "scores"}`` record each, where the
        prediction is a label name, a value (regression) or the chosen candidate. Batched, under
        inference mode, on the model's device."""
        from skeleton.predict import predict  # skeleton.predict imports the data and export modules

        return predict(self, inputs, batch_size=batch_size, max_length=max_length)

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        for logger in self.trainer.loggers:
            logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)
        if self.trainer.is_global_zero:
            print(
                f"trainable parameters: {counts['trainable']:,} of {counts['total']:,} "
                f"({100 * counts['trainable'] / counts['total']:.3f}%)"
            )

    def trainable_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Counts, after checking that nothing but the prompt and the head can train."""
        stray = [n for n in self.trainable_names() if not n.startswith(("prompt.", "head."))]
        if stray:
            raise RuntimeError(f"backbone parameters are trainable but must stay frozen: {stray[:5]}")
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {
            "trainable": trainable,
            "total": total,
            "prompt": sum(p.numel() for p in self.prompt.parameters()),
        }

    def configure_optimizers(self):
        groups = [
            *optimizer_groups(self.prompt, self.prompt_cfg.lr, self.prompt_cfg.reparam_lr),
            {
                "params": list(self.head.parameters()),
                "lr": self.hparams.head_lr,
                "weight_decay": self.hparams.weight_decay,
            },
        ]
        optimizer = torch.optim.AdamW(groups)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_scheduler(
            self.hparams.scheduler,
            optimizer,
            num_warmup_steps=int(self.hparams.warmup_ratio * total),
            num_training_steps=total,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- what was trained, and how to put it back ---------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """The prompt and the head, on the CPU: the one format of checkpoints, the prompt cache and
        skeleton artifacts (a backbone is never saved with them; its hash identifies it)."""
        return {
            k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith(TRAINED)
        }

    def load_trained_state(self, state: Mapping[str, torch.Tensor], source: str = "trained state") -> None:
        """Put a saved prompt and head back, refusing (naming ``source``) one that does not fit."""
        own = self.trained_state()
        missing = sorted(set(own) - set(state))
        unknown = sorted(k for k in state if k not in own)
        misshapen = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if missing or unknown or misshapen:
            problem = (
                f"missing {missing[:3]}"
                if missing
                else f"unknown keys {unknown[:3]}"
                if unknown
                else f"shapes differ: {misshapen[:3]}"
            )
            raise TrainedStateError(
                f"{source} does not fit this model ({problem}): it was trained with another backbone, task, "
                "prompt length or head; use the matching config, or delete it to train again"
            )
        self.load_state_dict(dict(state), strict=False)

    def on_backbone(self, backbone: nn.Module) -> PromptTunedModel:
        """This model's prompt and head (shared, not copied) on another backbone: the dense twin that a
        pruned model is timed and compared against."""
        twin = copy.copy(self)
        twin._modules = {**self._modules, "backbone": backbone}
        return twin

    def backbone_identity(self) -> dict:
        """Name and weights hash of the backbone; the hash is computed once per set of shapes (frozen)."""
        shapes = tuple(p.shape for p in self.backbone.parameters())
        if getattr(self, "_identity_key", None) != shapes:
            self._identity = {"name_or_path": self.backbone_name, "sha256": weights_hash(self.backbone)}
            self._identity_key = shapes
        return dict(self._identity)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.trained_state()
        checkpoint["skeleton_backbone"] = self.backbone_identity()


def _cpu(batch: dict) -> dict:
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
