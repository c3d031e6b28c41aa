"""PEFT prompt-tuning adapters in and out.

Out: `save_peft_adapter(model, folder)` writes the soft prompt as a PEFT `PROMPT_TUNING` adapter
(task type `FEATURE_EXTRACTION`, on the bare `AutoModel` backbone, as Skeleton uses it), which
`peft.PeftModel.from_pretrained(backbone, folder)` loads. PEFT has no slot for a head that lives outside
the base model (`modules_to_save` names base-model modules), so the head and the pooling go beside it in
`skeleton_head.safetensors` / `skeleton_head.json`, which PEFT ignores and `PeftTaskModel` reads.

In: `load_peft_prompt(folder)` reads a PEFT prompt-tuning adapter's embeddings; `prompt=peft
prompt.path=FOLDER` starts a run from them.

One difference cannot match: PEFT's prompt-learning forward drops `token_type_ids` (it warns and passes
None), so a BERT-style backbone sees segment 0 everywhere; Skeleton passes the real segment ids. On
single-sentence inputs (all zeros) and on backbones without token types the outputs are the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "skeleton_head.safetensors"
HEAD_META = "skeleton_head.json"
PROMPT_KEY = "prompt_embeddings"


class PeftAdapterError(ValueError):
    """A folder that is not a usable PEFT prompt-tuning adapter."""


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "PEFT interop needs peft: pip install 'skeleton[hub]' (or pip install peft)"
        ) from err
    return peft


def _dense_name(model) -> str:
    """The dense backbone the prompt was tuned on (a pruned model records it in skeleton_info)."""
    info = getattr(model, "skeleton_info", None) or {}
    return info.get("backbone", {}).get("name_or_path") or model.backbone_name


# ---- export ---------------------------------------------------------------------------------------
def save_peft_prompt(
    embeddings: torch.Tensor, path: str | Path, *, base_model: str | None = None, config=None
) -> Path:
    """Write `embeddings` (num_tokens, hidden) as a PEFT prompt-tuning adapter folder."""
    peft = _peft()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    num_tokens, hidden = embeddings.shape
    adapter = peft.PromptTuningConfig(
        task_type=peft.TaskType.FEATURE_EXTRACTION,
        num_virtual_tokens=num_tokens,
        token_dim=hidden,
        num_transformer_submodules=1,
        num_attention_heads=getattr(config, "num_attention_heads", None),
        num_layers=getattr(config, "num_hidden_layers", None),
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    adapter.save_pretrained(str(path))
    weights = {PROMPT_KEY: embeddings.detach().float().cpu().contiguous()}
    save_file(weights, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return path


def save_peft_adapter(model, path: str | Path) -> Path:
    """A PromptTunedModel's prompt as a PEFT adapter for its dense backbone, with its head beside it."""
    from skeleton.export import refuse_verbalizer

    refuse_verbalizer(model, "save_peft_adapter")
    if getattr(model.prompt, "deep", None) is not None:
        raise PeftAdapterError(
            "this model has a deep prompt (prompt.deep=true: vectors at every layer's input), which a PEFT "
            "PROMPT_TUNING adapter cannot hold (it carries the input prompt only); share the skeleton "
            "artifact or an export instead (skeleton.export / skeleton.hub), or train with an input-only "
            "prompt (prompt=vocab) for PEFT"
        )
    path = save_peft_prompt(
        model.prompt.embeddings, path, base_model=_dense_name(model), config=model.backbone.config
    )
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, path / HEAD_WEIGHTS, metadata={"format": "pt"})
    meta = {
        "task": model.task.name,
        "pooling": model.hparams.pooling,
        "head_hidden": model.hparams.head_hidden,
        "hidden_size": model.backbone.config.hidden_size,
    }
    (path / HEAD_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


# ---- import ---------------------------------------------------------------------------------------
def read_adapter_config(path: str | Path) -> dict:
    """adapter_config.json of a prompt-tuning adapter, refusing other PEFT methods by name."""
    path = Path(path).expanduser()
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise PeftAdapterError(f"{file} does not exist: prompt.path must be a PEFT adapter folder")
    config = json.loads(file.read_text())
    if config.get("peft_type") != "PROMPT_TUNING":
        raise PeftAdapterError(
            f"{file} is a {config.get('peft_type')!r} adapter; only PROMPT_TUNING adapters hold input-embedding "
            "soft prompts that Skeleton can start from"
        )
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise PeftAdapterError(
            f"{file} has prompts for an encoder-decoder model (2 submodules); not supported"
        )
    return config


def load_peft_prompt(
    path: str | Path, *, hidden_size: int | None = None, num_tokens: int | None = None
) -> torch.Tensor:
    """The (num_tokens, hidden) prompt embeddings of a PEFT prompt-tuning adapter, checked against the
    backbone's hidden size and the expected number of tokens."""
    path = Path(path).expanduser()
    config = read_adapter_config(path)
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise PeftAdapterError(
            f"{file} does not exist (Skeleton never unpickles adapter_model.bin): save the adapter with "
            "safe_serialization=True"
        )
    tensors = load_file(file)
    if PROMPT_KEY not in tensors:
        raise PeftAdapterError(f"{file} holds no '{PROMPT_KEY}' tensor (keys: {sorted(tensors)})")
    prompt = tensors[PROMPT_KEY]
    expected = (config["num_virtual_tokens"], config.get("token_dim") or prompt.shape[-1])
    if tuple(prompt.shape) != expected:
        raise PeftAdapterError(
            f"{file}: prompt of shape {tuple(prompt.shape)}, but its config says {expected}"
        )
    if hidden_size is not None and prompt.shape[1] != hidden_size:
        raise PeftAdapterError(
            f"{file}: the prompt has dimension {prompt.shape[1]} but the backbone's hidden size is {hidden_size}: "
            "the adapter was tuned on another backbone"
        )
    if num_tokens is not None and prompt.shape[0] != num_tokens:
        raise PeftAdapterError(
            f"{file}: the prompt has {prompt.shape[0]} tokens but prompt.num_tokens={num_tokens}: set "
            f"prompt.num_tokens={prompt.shape[0]} (or null to take the adapter's)"
        )
    return prompt.float()


def adapter_num_tokens(path: str | Path) -> int:
    return int(read_adapter_config(path)["num_virtual_tokens"])


# ---- PEFT model + Skeleton head ----------------------------------------------------------------------
def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int, pooling: str) -> torch.Tensor:
    """The pooling of PromptTunedModel.pool, on hidden states whose first `num_tokens` are the prompt."""
    if pooling == "first":
        return hidden[:, num_tokens]
    if pooling == "prompt":
        return hidden[:, :num_tokens].mean(dim=1)
    if pooling == "last":
        last = attention_mask.sum(dim=1) - 1 + num_tokens
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.to(hidden.dtype)
    text = hidden[:, num_tokens:]
    return (text * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)


class PeftTaskModel(nn.Module):
    """A PEFT prompt-tuned backbone plus the Skeleton head saved beside the adapter: task predictions
    from PEFT's own forward."""

    def __init__(self, peft_model: nn.Module, head: nn.Module, pooling: str, num_tokens: int):
        super().__init__()
        self.peft_model, self.head, self.pooling, self.num_tokens = peft_model, head, pooling, num_tokens

    @classmethod
    def from_pretrained(cls, path: str | Path, backbone: nn.Module | None = None) -> PeftTaskModel:
        """`backbone` defaults to the adapter's `base_model_name_or_path`, loaded as Skeleton loads
        backbones (a Hub name, a folder, `demo` or `tiny:<family>`)."""
        from skeleton.backbones import load_backbone
        from skeleton.heads import TaskHead
        from skeleton.tasks import get_task

        peft, path = _peft(), Path(path)
        config = read_adapter_config(path)
        if backbone is None:
            backbone = load_backbone(config["base_model_name_or_path"])
        meta = json.loads((path / HEAD_META).read_text())
        task = get_task(meta["task"])
        head = TaskHead(task.formulation, meta["hidden_size"], task.num_labels, meta["head_hidden"])
        head.load_state_dict(load_file(path / HEAD_WEIGHTS), strict=True)
        peft_model = peft.PeftModel.from_pretrained(backbone, str(path))
        return cls(peft_model, head, meta["pooling"], config["num_virtual_tokens"]).eval()

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        pooled = pool(hidden, batch["attention_mask"], self.num_tokens, self.pooling)
        return self.head(pooled, batch.get("num_choices", 1), batch.get("choice_mask"))
