"""Save, reload and serve pruned models: safetensors + JSON only (nothing is ever unpickled).

Three artifact kinds share one layout: ``skeleton.safetensors`` (the trained prompt + head, as
``PromptTunedModel.trained_state()`` gives them, plus kept indices where there are any) and ``skeleton.json``
(kind, task, model arguments, the dense backbone's identity), written last so its presence marks a
complete folder:

- **prompt** (``save_trained`` / ``load_trained``): prompt + head only; the prompt cache's entries.

- **skeleton** (``save_skeleton`` / ``load_skeleton``): a few hundred KB holding the prompt, the head and
  the kept neuron (and head) indices, but no backbone weights. Loading rebuilds the dense backbone it was
  cut from, checks its weights hash and prunes it again.
- **export** (``export_pruned`` / ``load_pruned``): a self-contained folder with the pruned backbone's
  weights, its HF config (carrying the per-layer widths), the tokenizer files, the prompt and the head.
  Loading needs no dense weights at all.

``skeleton.predict`` runs either kind on inputs; ``skeleton-predict`` is its command line.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel

from skeleton import hf_native, hub
from skeleton.backbones import load_tokenizer, weights_hash
from skeleton.localize import ffn_widths, heads_per_layer, prune_units, resize_to_widths
from skeleton.localize.reconstruct import TENSOR_PREFIX, Compensation
from skeleton.prompt import PromptTunedModel
from skeleton.runs import write_json_atomic

PLAIN_FORMAT = 1  # what every reader loads: written whenever nothing needs a newer one
COMPENSATED_FORMAT = 2  # a skeleton carrying compensation (comp.* tensors): older readers must refuse it
FORMAT_VERSION = COMPENSATED_FORMAT  # the newest this code reads
META = "skeleton.json"
TENSORS = "skeleton.safetensors"
WEIGHTS = "model.safetensors"
KIND_PROMPT, KIND_SKELETON, KIND_EXPORT = "prompt", "skeleton", "export"
KINDS = (KIND_PROMPT, KIND_SKELETON, KIND_EXPORT)


class BackboneMismatchError(ValueError):
    """The dense backbone found at load time is not the one the skeleton's indices refer to."""


class ArtifactError(ValueError):
    """A folder that is not a readable skeleton artifact or export."""


REWRITE = "the file is truncated or corrupt (a run killed while writing it?); re-export the skeleton"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """An artifact's safetensors file, or an ArtifactError naming it (never a bare SafetensorError)."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: {REWRITE}") from None
    except Exception as err:  # safetensors raises its own, non-OSError types for bad headers
        raise ArtifactError(f"{path} is unreadable ({err}): {REWRITE}") from None


# ---- small shared pieces -------------------------------------------------------------------------
def model_hparams(model: PromptTunedModel) -> dict:
    """The constructor arguments needed to rebuild the model (not derived objects such as prompt_cfg)."""
    names = [n for n in inspect.signature(PromptTunedModel.__init__).parameters if n != "self"]
    return {n: model.hparams[n] for n in names if n in model.hparams}


def trained_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prompt + head part of an artifact's tensors (the rest are kept indices and compensation)."""
    return {k: v for k, v in tensors.items() if not k.startswith(("keep.", TENSOR_PREFIX))}


def prune_as_saved(backbone: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Cut a dense backbone to a skeleton's kept units and fold in its compensation: the one way both a
    reload and a serving view rebuild the saved network."""
    n = meta["num_layers"]
    heads = (
        [tensors[f"keep.heads.{i}"] for i in range(n)] if meta.get("heads_per_layer") is not None else None
    )
    ffn = [tensors[f"keep.ffn.{i}"] for i in range(n)]
    prune_units(backbone, ffn, heads, Compensation.from_tensors(tensors, n))


def _indices(keep, width: int) -> torch.Tensor:
    """Sorted unique kept indices from indices, a bool mask or None (= all `width`)."""
    if keep is None:
        return torch.arange(width)
    keep = torch.as_tensor(keep).cpu()
    if keep.dtype == torch.bool:
        return keep.nonzero().view(-1)
    return torch.unique(keep.long().view(-1))


def _normalise_keep(keep, current: list[int], what: str) -> list[torch.Tensor]:
    """Indices per layer, checked against the model's current shapes: the saved model must be the pruned
    one, so that load -> prune reproduces it exactly."""
    if len(keep) != len(current):
        raise ValueError(f"{what} has {len(keep)} entries but the backbone has {len(current)} layers")
    out = [_indices(k, w) for k, w in zip(keep, current)]
    wrong = [i for i, (k, w) in enumerate(zip(out, current)) if len(k) != w]
    if wrong:
        raise ValueError(
            f"{what} keeps {[len(out[i]) for i in wrong]} in layer(s) {wrong} but the model has "
            f"{[current[i] for i in wrong]} there: prune the model with these indices before saving it"
        )
    return out


def resolve_artifact(path: str | Path) -> Path:
    """The artifact folder: `path` itself, or the `skeleton/` folder of a training run directory."""
    path = Path(path).expanduser()
    if not path.exists() and hub.is_repo_id(path):  # not a local folder: a Hub repo id
        return resolve_artifact(hub.resolve(path))
    if not path.exists():
        raise ArtifactError(f"{path} does not exist: pass a skeleton artifact, an export or a run folder")
    for candidate in (path, path / "skeleton"):
        if (candidate / META).is_file():
            return candidate
    raise ArtifactError(
        f"{path} holds no {META}: pass a folder written by save_skeleton/export_pruned, or a run folder "
        "with a skeleton/ subfolder (runs write one when save_artifact=true and pruning ran)"
    )


def read_meta(path: str | Path) -> dict:
    path = resolve_artifact(path)
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path / META} is unreadable ({err}): {REWRITE}") from None
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise ArtifactError(f"{path / META} is not a skeleton artifact (kind={kind!r}): {REWRITE}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {meta['format_version']}; this skeleton reads up to {FORMAT_VERSION}: "
            "upgrade the package"
        )
    return meta


# ---- skeleton artifact: indices + prompt + head ---------------------------------------------------
def save_skeleton(
    model: PromptTunedModel,
    path: str | Path,
    *,
    keep_ffn: list,
    keep_heads: list | None = None,
    dense_identity: dict,
    extra: dict | None = None,
    compensation: Compensation | None = None,
) -> Path:
    """Write the small artifact of a pruned model. `keep_ffn` / `keep_heads` are the per-layer indices it
    was pruned with (relative to the dense backbone); `dense_identity` is `model.backbone_identity()` taken
    BEFORE pruning, so a loader can verify it starts from the very same dense weights; `compensation` is
    what was folded into its weights after slicing (``skeleton.reconstruct``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    ffn = _normalise_keep(keep_ffn, ffn_widths(backbone), "keep_ffn")
    heads = (
        None if keep_heads is None else _normalise_keep(keep_heads, heads_per_layer(backbone), "keep_heads")
    )
    tensors = {f"keep.ffn.{i}": k for i, k in enumerate(ffn)}
    tensors.update({f"keep.heads.{i}": k for i, k in enumerate(heads or [])})
    layout = {
        "num_layers": len(ffn),
        "ffn_widths": [len(k) for k in ffn],
        "heads_per_layer": None if heads is None else [len(k) for k in heads],
    }
    if compensation is not None:  # readers before format 2 would drop it silently: they must refuse
        tensors.update(compensation.to_tensors())
        layout["format_version"] = COMPENSATED_FORMAT
    return _write_artifact(model, path, KIND_SKELETON, dense_identity, tensors, layout, extra)


def save_trained(model: PromptTunedModel, path: str | Path, *, extra: dict | None = None) -> Path:
    """A prompt + head artifact (no kept indices): what the prompt cache stores per converged prompt.
    Taken before pruning, so the identity is the dense backbone's."""
    return _write_artifact(model, Path(path), KIND_PROMPT, model.backbone_identity(), {}, {}, extra)


def _write_artifact(model, path: Path, kind: str, identity: dict, tensors: dict, layout: dict, extra) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{TENSORS}.tmp"
    save_file({**model.trained_state(), **tensors}, tmp, metadata={"format": "pt"})
    tmp.replace(path / TENSORS)
    meta = {
        "kind": kind,
        "format_version": PLAIN_FORMAT,
        "task": model.task.name,
        "backbone": {"name_or_path": identity["name_or_path"], "sha256": identity["sha256"]},
        "model": model_hparams(model),
        **layout,
        "extra": extra or {},
    }
    write_json_atomic(path / META, meta)  # last: a folder with a skeleton.json is complete
    return path


def load_trained(model: PromptTunedModel, path: str | Path) -> dict:
    """Put an artifact's prompt and head into ``model`` (checked against it); returns its metadata."""
    path = resolve_artifact(path)
    meta = read_meta(path)
    model.load_trained_state(trained_of(read_tensors(path / TENSORS)), source=str(path / TENSORS))
    return meta


def build_dense(
    path: str | Path, backbone: str | None = None, *, check_hash: bool = True
) -> PromptTunedModel:
    """The dense model a skeleton was cut from, with the artifact's prompt and head (not pruned yet).

    `backbone` overrides the backbone named in skeleton.json (e.g. a local copy of it)."""
    path = resolve_artifact(path)
    meta = read_meta(path)
    if meta["kind"] == KIND_EXPORT:
        raise ArtifactError(f"{path} is an export (it holds pruned weights): load it with load_pruned")
    source = backbone or meta["backbone"]["name_or_path"]
    model = PromptTunedModel(**{**meta["model"], "backbone": source})
    if check_hash:
        _check_identity(model, meta, source, path)
    load_trained(model, path)
    model.skeleton_info = meta
    return model.eval()


def _check_identity(model: PromptTunedModel, meta: dict, source: str, path: Path) -> None:
    expected, found = meta["backbone"]["sha256"], weights_hash(model.backbone)
    if expected != found:
        raise BackboneMismatchError(
            f"the skeleton {path} was made from backbone {meta['backbone']['name_or_path']!r} with weights "
            f"sha256 {expected}, but {source!r} has sha256 {found}. Its kept-neuron indices only make sense "
            "on the same dense weights: pass the backbone the skeleton was made from (backbone=... / "
            "--backbone PATH), or check_hash=False to force loading anyway."
        )


def apply_keep(model: PromptTunedModel, path: str | Path) -> PromptTunedModel:
    """Prune a dense model in place with the kept indices (and compensation) stored in the skeleton at
    `path`."""
    path = resolve_artifact(path)
    meta, tensors = read_meta(path), read_tensors(path / TENSORS)
    prune_as_saved(model.backbone, meta, tensors)
    if ffn_widths(model.backbone) != meta["ffn_widths"]:
        raise ArtifactError(
            f"pruning with {path} gave widths {ffn_widths(model.backbone)}, not {meta['ffn_widths']}"
        )
    return model


def load_skeleton(
    path: str | Path, backbone: str | None = None, *, check_hash: bool = True
) -> PromptTunedModel:
    """Rebuild the saved pruned model: dense backbone (verified by hash) -> prune -> prompt and head.
    Returned in eval mode; its predictions equal those of the model that was saved."""
    path = resolve_artifact(path)  # a Hub repo id is downloaded once, here
    return apply_keep(build_dense(path, backbone, check_hash=check_hash), path)


# ---- standalone export: pruned weights + config + tokenizer ---------------------------------------
def _state_dict_for_safetensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each key its own copy."""
    seen, out = set(), {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def refuse_verbalizer(model: PromptTunedModel, what: str) -> None:
    """Formats that hold the backbone alone cannot carry a verbalizer's LM output layer (yet)."""
    if model.hparams.get("head", "linear") == "verbalizer":
        raise ArtifactError(
            f"{what} does not support module.head=verbalizer: it would need the language model's output "
            "layer, which it does not save. Save a skeleton artifact (save_skeleton, the run's skeleton/ "
            "folder) instead: load_skeleton and skeleton-predict rebuild the LM head from the dense backbone"
        )


def export_pruned(model: PromptTunedModel, path: str | Path, *, extra: dict | None = None) -> Path:
    """Write a folder that serves the pruned model without the dense weights: config.json (with
    `skeleton_ffn_widths` / `skeleton_heads_per_layer`), model.safetensors (pruned backbone), tokenizer
    files, skeleton.safetensors (prompt + head) and skeleton.json."""
    refuse_verbalizer(model, "export_pruned")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    backbone.config.skeleton_ffn_widths = ffn_widths(backbone)
    backbone.config.skeleton_heads_per_layer = heads_per_layer(backbone)
    hf_native.save_config(backbone, path)  # loadable with AutoModel.from_pretrained
    save_file(_state_dict_for_safetensors(backbone), path / WEIGHTS, metadata={"format": "pt"})
    tokenizer_for(model).save_pretrained(path)
    save_file(model.trained_state(), path / TENSORS, metadata={"format": "pt"})
    info = getattr(model, "skeleton_info", None) or {}
    dense = info.get("backbone") or {"name_or_path": model.backbone_name}
    meta = {
        "kind": KIND_EXPORT,
        "format_version": PLAIN_FORMAT,  # the compensation is in its weights already
        "task": model.task.name,
        "backbone": dense,  # the dense backbone it was cut from (provenance; not needed to load)
        "model": model_hparams(model),
        "num_layers": len(backbone.config.skeleton_ffn_widths),
        "ffn_widths": backbone.config.skeleton_ffn_widths,
        "heads_per_layer": backbone.config.skeleton_heads_per_layer,
        "extra": {**info.get("extra", {}), **(extra or {})},
    }
    write_json_atomic(path / META, meta)
    return path


def build_pruned_backbone(path: str | Path) -> nn.Module:
    """The exported backbone: dense shapes from config.json, shrunk to the recorded widths, then loaded."""
    path = Path(path)
    if hf_native.is_native(path):  # exports written since the pruned classes exist
        return hf_native.load_backbone(path)
    state = read_tensors(path / WEIGHTS)
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(path))
    resize_to_widths(backbone)
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    if floats:  # built in the default dtype; a half-precision export must stay half precision
        backbone.to(floats[0])
    backbone.load_state_dict(state, strict=True)
    return backbone.eval()


def load_pruned(path: str | Path) -> PromptTunedModel:
    """Rebuild an exported model from its own folder (or Hub repo) only: no dense weights. Eval mode.

    The pruned backbone is rebuilt from the export's config and handed to the model ready-made."""
    path = resolve_artifact(path)
    meta = read_meta(path)
    if meta["kind"] != KIND_EXPORT:
        raise ArtifactError(f"{path} is a skeleton artifact (no weights): load it with load_skeleton")
    backbone = build_pruned_backbone(path)
    model = PromptTunedModel(**{**meta["model"], "backbone": str(path)}, backbone_module=backbone)
    model.to(next(backbone.parameters()).dtype)  # prompt and head in the exported dtype too
    load_trained(model, path)
    model.skeleton_info = meta
    return model.eval()


def load_model(path: str | Path, backbone: str | None = None, *, check_hash: bool = True) -> PromptTunedModel:
    """Any artifact (or a run folder, or a Hub repo id): what the command-line tools accept."""
    path = resolve_artifact(path)
    kind = read_meta(path)["kind"]
    if kind == KIND_EXPORT:
        return load_pruned(path)
    if kind == KIND_PROMPT:
        return build_dense(path, backbone, check_hash=check_hash)
    return load_skeleton(path, backbone, check_hash=check_hash)


def tokenizer_for(model: PromptTunedModel):
    """The backbone's tokenizer; a local override folder without tokenizer files falls back to the
    backbone named in the artifact (same weights hash, so the same vocabulary)."""
    try:
        return load_tokenizer(model.backbone_name)
    except (OSError, ValueError):
        original = (getattr(model, "skeleton_info", None) or {}).get("backbone", {}).get("name_or_path")
        if not original or original == model.backbone_name:
            raise
        return load_tokenizer(original)
