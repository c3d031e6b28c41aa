"""Exports that load with `AutoModel.from_pretrained(folder)`.

Importing this module registers, for every supported family, the pruned config/model pair of
`skeleton.hf_modeling` with transformers' `AutoConfig` / `AutoModel` (model type
`skeleton-pruned-<family>`). Their configs name the family (`skeleton_family`), which is how the
localization adapters find their layers, so a natively loaded backbone is pruned, scored and wrapped
like any other.

An export's config.json names that model type, carries the per-layer widths and an `auto_map` pointing at
its own copy of `hf_modeling.py`: with Skeleton installed `AutoModel.from_pretrained(folder)` loads it;
without, `AutoModel.from_pretrained(folder, trust_remote_code=True)` does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from skeleton import hf_modeling
from skeleton.hf_modeling import CODE_FILE, FAMILIES, PREFIX
from skeleton.localize import ffn_widths, heads_per_layer, layer_parts
from skeleton.localize.skip import refresh_skips

_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_DROP = ("model_type", "architectures", "auto_map", "transformers_version")


def register() -> None:
    """Register the pruned classes with the Auto classes (idempotent)."""
    for config_cls, model_cls in hf_modeling.CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)


register()


def family_of(config: PretrainedConfig) -> str | None:
    """The supported family of a dense or pruned config, or None."""
    model_type = getattr(config, "model_type", "")
    family = model_type[len(PREFIX) :] if model_type.startswith(PREFIX) else model_type
    return family if family in FAMILIES else None


def is_native(path: str | Path) -> bool:
    """Whether the config.json in `path` names one of the pruned model types."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type", "").startswith(PREFIX)


def pruned_config(backbone: nn.Module) -> PretrainedConfig:
    """The backbone's config as its family's pruned config class, with widths and an auto_map."""
    family = family_of(backbone.config)
    config_cls, model_cls = hf_modeling.CLASSES[family]
    values = {k: v for k, v in backbone.config.to_dict().items() if k not in _DROP}
    values.update(
        skeleton_ffn_widths=ffn_widths(backbone), skeleton_heads_per_layer=heads_per_layer(backbone)
    )
    config = config_cls(**values)
    module = CODE_FILE.removesuffix(".py")
    config.auto_map = {
        "AutoConfig": f"{module}.{config_cls.__name__}",
        "AutoModel": f"{module}.{model_cls.__name__}",
    }
    config.architectures = [model_cls.__name__]
    return config


def save_config(backbone: nn.Module, path: str | Path) -> bool:
    """Write config.json for an export: the native pruned config plus its code file when the family is
    one `hf_modeling` knows, else the plain config with the widths (loadable by `load_pruned` only).
    Returns whether the native form was written."""
    path = Path(path)
    if family_of(backbone.config) is None:
        backbone.config.save_pretrained(path)
        return False
    pruned_config(backbone).save_pretrained(path)
    shutil.copyfile(hf_modeling.__file__, path / CODE_FILE)
    return True


def _weights_dtype(path: Path) -> torch.dtype | None:
    """The dtype of the first floating tensor in model.safetensors, read from its header only."""
    with safe_open(path / "model.safetensors", framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            dtype = f.get_slice(key).get_dtype()
            if dtype in _FLOATS:
                return _FLOATS[dtype]
    return None


def load_backbone(path: str | Path) -> nn.Module:
    """The pruned backbone of a native export, through the Auto class a user would call, in the dtype
    its weights were saved in (a half-precision export stays half precision)."""
    model, info = AutoModel.from_pretrained(
        str(path), dtype=_weights_dtype(Path(path)), output_loading_info=True
    )
    wrong = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if wrong or info.get("error_msgs"):
        raise ValueError(f"{path}: the pruned weights do not fit the config's shapes: {wrong or info}")
    refresh_skips(layer_parts(model))  # layers left with no heads skip their attention, as when pruned
    return model.eval()


class SkeletonForTask:
    """The task model (pruned backbone + soft prompt + head) of an export or skeleton, by folder or repo id.

    `SkeletonForTask.from_pretrained("user/repo")` returns a `PromptTunedModel` in eval mode."""

    @staticmethod
    def from_pretrained(path_or_repo: str | Path, *, revision: str | None = None, **kwargs):
        from skeleton.export import load_model
        from skeleton.hub import resolve

        return load_model(resolve(path_or_repo, revision=revision), **kwargs)
