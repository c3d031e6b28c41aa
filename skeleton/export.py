"""Save, reload and serve pruned models: safetensors + JSON only (nothing is ever unpickled).

Two artifact kinds, both described by a ``skeleton.json``:

- **skeleton** (``save_skeleton`` / ``load_skeleton``): a few hundred KB holding the prompt, the head and
  the kept neuron (and head) indices, but no backbone weights. Loading rebuilds the dense backbone it was
  cut from, checks its weights hash and prunes it again.
- **export** (``export_pruned`` / ``load_pruned``): a self-contained folder with the pruned backbone's
  weights, its HF config (carrying the per-layer widths), the tokenizer files, the prompt and the head.
  Loading needs no dense weights at all.

``skeleton-predict`` serves either kind on a file in the task's official format.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from skeleton import hf_native, hub
from skeleton.backbones import load_tokenizer, weights_hash
from skeleton.localize import ffn_widths, heads_per_layer, prune_ffn, prune_heads, resize_to_widths
from skeleton.prompt import PromptTunedModel

FORMAT_VERSION = 1
META = "skeleton.json"
TENSORS = "skeleton.safetensors"
WEIGHTS = "model.safetensors"
KIND_SKELETON, KIND_EXPORT = "skeleton", "export"


class BackboneMismatchError(ValueError):
    """The dense backbone found at load time is not the one the skeleton's indices refer to."""


class ArtifactError(ValueError):
    """A folder that is not a readable skeleton artifact or export."""


# ---- small shared pieces -------------------------------------------------------------------------
def model_hparams(model: PromptTunedModel) -> dict:
    """The constructor arguments needed to rebuild the model (not derived objects such as prompt_cfg)."""
    names = [n for n in inspect.signature(PromptTunedModel.__init__).parameters if n != "self"]
    return {n: model.hparams[n] for n in names if n in model.hparams}


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _trained_tensors(model: PromptTunedModel) -> dict[str, torch.Tensor]:
    tensors = {"prompt.embeddings": model.prompt.embeddings}
    tensors.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _load_trained(model: PromptTunedModel, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model.prompt.embeddings.copy_(tensors["prompt.embeddings"])
    head = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
    model.head.load_state_dict(head, strict=True)


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
    meta = json.loads((path / META).read_text())
    if meta.get("kind") not in (KIND_SKELETON, KIND_EXPORT):
        raise ArtifactError(f"{path / META} is not a skeleton artifact (kind={meta.get('kind')!r})")
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
) -> Path:
    """Write the small artifact of a pruned model. `keep_ffn` / `keep_heads` are the per-layer indices it
    was pruned with (relative to the dense backbone); `dense_identity` is `model.backbone_identity()` taken
    BEFORE pruning, so a loader can verify it starts from the very same dense weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    ffn = _normalise_keep(keep_ffn, ffn_widths(backbone), "keep_ffn")
    heads = (
        None if keep_heads is None else _normalise_keep(keep_heads, heads_per_layer(backbone), "keep_heads")
    )
    tensors = _trained_tensors(model)
    tensors.update({f"keep.ffn.{i}": k for i, k in enumerate(ffn)})
    tensors.update({f"keep.heads.{i}": k for i, k in enumerate(heads or [])})
    save_file(tensors, path / TENSORS, metadata={"format": "pt"})
    meta = {
        "kind": KIND_SKELETON,
        "format_version": FORMAT_VERSION,
        "task": model.task.name,
        "backbone": {"name_or_path": dense_identity["name_or_path"], "sha256": dense_identity["sha256"]},
        "model": model_hparams(model),
        "num_layers": len(ffn),
        "ffn_widths": [len(k) for k in ffn],
        "heads_per_layer": None if heads is None else [len(k) for k in heads],
        "extra": extra or {},
    }
    _write_json(path / META, meta)  # last: a folder with a skeleton.json is complete
    return path


def build_dense(
    path: str | Path, backbone: str | None = None, *, check_hash: bool = True
) -> PromptTunedModel:
    """The dense model a skeleton was cut from, with the artifact's prompt and head (not pruned yet).

    `backbone` overrides the backbone named in skeleton.json (e.g. a local copy of it)."""
    path = resolve_artifact(path)
    meta = read_meta(path)
    if meta["kind"] != KIND_SKELETON:
        raise ArtifactError(f"{path} is an export (it holds pruned weights): load it with load_pruned")
    source = backbone or meta["backbone"]["name_or_path"]
    model = PromptTunedModel(**{**meta["model"], "backbone": source})
    if check_hash:
        _check_identity(model, meta, source, path)
    _load_trained(model, load_file(path / TENSORS))
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
    """Prune a dense model in place with the kept indices stored in the skeleton at `path`."""
    path = resolve_artifact(path)
    meta, tensors = read_meta(path), load_file(path / TENSORS)
    n = meta["num_layers"]
    prune_ffn(model.backbone, [tensors[f"keep.ffn.{i}"] for i in range(n)])
    if meta.get("heads_per_layer") is not None:
        prune_heads(model.backbone, [tensors[f"keep.heads.{i}"] for i in range(n)])
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


def export_pruned(model: PromptTunedModel, path: str | Path, *, extra: dict | None = None) -> Path:
    """Write a folder that serves the pruned model without the dense weights: config.json (with
    `skeleton_ffn_widths` / `skeleton_heads_per_layer`), model.safetensors (pruned backbone), tokenizer
    files, skeleton.safetensors (prompt + head) and skeleton.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    backbone.config.skeleton_ffn_widths = ffn_widths(backbone)
    backbone.config.skeleton_heads_per_layer = heads_per_layer(backbone)
    hf_native.save_config(backbone, path)  # loadable with AutoModel.from_pretrained
    save_file(_state_dict_for_safetensors(backbone), path / WEIGHTS, metadata={"format": "pt"})
    _tokenizer_for(model).save_pretrained(path)
    save_file(_trained_tensors(model), path / TENSORS, metadata={"format": "pt"})
    info = getattr(model, "skeleton_info", None) or {}
    dense = info.get("backbone") or {"name_or_path": model.backbone_name}
    meta = {
        "kind": KIND_EXPORT,
        "format_version": FORMAT_VERSION,
        "task": model.task.name,
        "backbone": dense,  # the dense backbone it was cut from (provenance; not needed to load)
        "model": model_hparams(model),
        "num_layers": len(backbone.config.skeleton_ffn_widths),
        "ffn_widths": backbone.config.skeleton_ffn_widths,
        "heads_per_layer": backbone.config.skeleton_heads_per_layer,
        "extra": {**info.get("extra", {}), **(extra or {})},
    }
    _write_json(path / META, meta)
    return path


def build_pruned_backbone(path: str | Path) -> nn.Module:
    """The exported backbone: dense shapes from config.json, shrunk to the recorded widths, then loaded."""
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    if hf_native.is_native(path):  # exports written since the pruned classes exist
        return hf_native.load_backbone(path)
    state = load_file(path / WEIGHTS)
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
    _load_trained(model, load_file(path / TENSORS))
    model.skeleton_info = meta
    return model.eval()


def load_model(path: str | Path, backbone: str | None = None, *, check_hash: bool = True) -> PromptTunedModel:
    """Either kind of artifact (or a run folder, or a Hub repo id): what the command-line tools accept."""
    path = resolve_artifact(path)
    meta = read_meta(path)
    if meta["kind"] == KIND_EXPORT:
        return load_pruned(path)
    return load_skeleton(path, backbone, check_hash=check_hash)


def _tokenizer_for(model: PromptTunedModel):
    """The backbone's tokenizer; a local override folder without tokenizer files falls back to the
    backbone named in the artifact (same weights hash, so the same vocabulary)."""
    try:
        return load_tokenizer(model.backbone_name)
    except (OSError, ValueError):
        original = (getattr(model, "skeleton_info", None) or {}).get("backbone", {}).get("name_or_path")
        if not original or original == model.backbone_name:
            raise
        return load_tokenizer(original)


# ---- skeleton-predict ----------------------------------------------------------------------------
def read_inputs(spec, path: str | Path) -> list[dict]:
    """Rows of an official-format file, refusing the other benchmark's format up front."""
    from skeleton.tasks import DataFormatError, read_split

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    wanted = ".tsv" if spec.benchmark == "glue" else ".jsonl"
    if path.suffix != wanted:
        raise DataFormatError(
            f"{path}: {spec.name} inputs are {spec.benchmark.upper()} {wanted[1:].upper()} files "
            f"(like the official {spec.files.get('dev', spec.files.get('test'))}); got a {path.suffix or 'suffix-less'} file"
        )
    return read_split(spec, path)


def prediction_record(spec, index: int, row: dict, n_choices: int, logits: torch.Tensor) -> dict:
    """One output line: the label name (classification, COPA), the value (regression) or the chosen
    candidate (ReCoRD), plus the raw scores."""
    scores = logits[:n_choices] if spec.formulation == "multiple_choice" else logits.reshape(-1)
    record: dict = {"index": index}
    if spec.benchmark == "superglue" and "idx" in row:  # SuperGLUE submissions key on the file's idx
        record["idx"] = row["idx"]
    if spec.formulation == "regression":
        record["prediction"] = float(scores[0])
    else:
        best = int(scores.argmax())
        if spec.labels is not None:
            record["prediction"] = spec.labels[best]
        elif "entities" in row:
            record["prediction"] = row["entities"][best]
        else:
            record["prediction"] = best
    record["scores"] = [round(float(s), 6) for s in scores]
    return record


@torch.inference_mode()
def predict_file(model, input_path, *, batch_size=64, max_length=128, limit=None, device="cpu"):
    """Predict every example of an official-format file. Returns (records, metrics or None, seconds)."""
    from torch.utils.data import DataLoader

    from skeleton.data import TokenizedSplit, collator_for, tokenize
    from skeleton.evaluate import to_device

    spec = model.task
    rows = read_inputs(spec, input_path)[:limit]
    examples = [spec.convert(row) for row in rows]
    tokenizer = _tokenizer_for(model)
    dataset = TokenizedSplit(tokenize(examples, tokenizer, max_length))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator_for(tokenizer, spec))
    labelled = bool(examples) and all(ex.label != -1 for ex in examples)
    metrics = spec.build_metrics() if labelled else None
    model.to(device).eval()
    outputs = []
    started = time.perf_counter()
    for batch in loader:
        logits = model(to_device(batch, device)).float().cpu()
        outputs.append(logits)
        if metrics is not None:
            metrics.update(logits, batch)
    seconds = time.perf_counter() - started
    logits = [row for out in outputs for row in out]
    records = [
        prediction_record(spec, i, row, len(ex.texts), lg)
        for i, (row, ex, lg) in enumerate(zip(rows, examples, logits))
    ]
    return records, (metrics.compute() if metrics is not None else None), seconds


def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skeleton-predict",
        description="Predict with a skeleton artifact, an export or a run folder on an official GLUE TSV / "
        "SuperGLUE JSONL file. Writes one JSON line per example; prints throughput and, when the file "
        "has gold labels, the task metrics.",
    )
    parser.add_argument(
        "artifact", help="skeleton artifact, export folder, or run folder (uses its skeleton/)"
    )
    parser.add_argument("--input", required=True, help="official-format input file (labels optional)")
    parser.add_argument("--output", default="preds.jsonl", help="where to write predictions (JSON lines)")
    parser.add_argument(
        "--backbone", help="dense backbone to rebuild a skeleton on (overrides skeleton.json)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from skeleton.tasks import DataFormatError

    try:
        model = load_model(args.artifact, args.backbone)
        records, metrics, seconds = predict_file(
            model,
            args.input,
            batch_size=args.batch_size,
            max_length=args.max_length,
            limit=args.limit,
            device=args.device,
        )
    except (ArtifactError, BackboneMismatchError, DataFormatError, FileNotFoundError) as err:
        print(f"skeleton-predict: error: {err}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    rate = len(records) / max(seconds, 1e-9)
    print(f"{len(records)} examples in {seconds:.2f}s: {rate:.1f} examples/s ({args.device}); wrote {output}")
    if metrics is not None:
        print(f"{model.task.name}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(predict_main())
