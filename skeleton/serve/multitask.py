"""One dense backbone in memory, many skeletons on it: the library side of serving.

Each registered task gets a *view* of the backbone: a new module tree whose Parameters are the dense
backbone's own tensor objects, pruned with the artifact's indices by the very functions that pruned it at
training time. Pruning replaces the sliced Parameters on the view only, so embeddings, attention and
layer norms stay one storage shared by every task, and the task owns just its sliced FFN (and, if it
prunes heads, attention) weights, its prompt and its head. Views are built once at registration, never
per request, and need no lock: tasks never touch each other's modules.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from skeleton.backbones import load_backbone, load_tokenizer, weights_hash
from skeleton.data import TokenizedSplit, collator_for, tokenize
from skeleton.export import (
    KIND_SKELETON,
    TENSORS,
    ArtifactError,
    BackboneMismatchError,
    prune_as_saved,
    read_meta,
    read_tensors,
    resolve_artifact,
    trained_of,
)
from skeleton.localize import backbone_flops, check_adapter, layer_parts
from skeleton.predict import prediction_record
from skeleton.prompt import PromptTunedModel

TRUNCATION_POLICIES = ("truncate", "reject")


class UnknownTaskError(KeyError):
    """A request names a task that is not registered."""

    def __str__(self) -> str:
        return self.args[0]


class InputError(ValueError):
    """A request's inputs do not fit the task (missing/extra fields, empty, too long)."""


# ---- sharing: a module tree over the same tensors --------------------------------------------------
def share_modules(module: nn.Module) -> nn.Module:
    """A copy of the module tree that holds the very same Parameter and buffer objects.

    Assigning a new Parameter on the copy (what pruning does) leaves the original untouched, while
    everything not reassigned stays one storage. The config is copied too, because pruning records
    the new widths on it."""
    memo: dict[int, nn.Module] = {}
    config = copy.copy(module.config) if hasattr(module, "config") else None
    return _share(module, memo, module.config if config is not None else None, config)


def _share(module: nn.Module, memo: dict, old_config, new_config) -> nn.Module:
    if id(module) in memo:  # a submodule reachable twice stays one module in the copy
        return memo[id(module)]
    clone = copy.copy(module)
    memo[id(module)] = clone
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {
        k: None if m is None else _share(m, memo, old_config, new_config) for k, m in module._modules.items()
    }
    if old_config is not None and getattr(module, "config", None) is old_config:
        clone.__dict__["config"] = new_config
    return clone


def _storages(tensors) -> dict[int, int]:
    """Bytes per distinct storage (keyed by data pointer), so a shared tensor is counted once."""
    out = {}
    for t in tensors:
        out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def _ffn_modules(backbone: nn.Module) -> list[nn.Module]:
    return [m for p in layer_parts(backbone) for m in (p.up, p.gate, p.down) if m is not None]


def _module_tensors(module: nn.Module):
    return [*module.parameters(), *module.buffers()]


# ---- inputs ------------------------------------------------------------------------------------------
def input_fields(spec) -> tuple[str, ...]:
    """The text fields a request row must carry, in the task's own (hub) names."""
    if spec.fields:
        return tuple(spec.fields)
    return tuple(k for k in (spec.columns or {}) if k != "label")


def _placeholder_label(spec):
    return 0.0 if spec.formulation == "regression" else 0


def _as_row(spec, fields: tuple[str, ...], item, i: int) -> dict:
    """One request input as a reader row; a bare string is accepted for single-text tasks."""
    if isinstance(item, str) and len(fields) == 1:
        item = {fields[0]: item}
    if not isinstance(item, dict):
        raise InputError(
            f"inputs[{i}] must be an object with the fields {list(fields)}"
            + (" (or a plain string)" if len(fields) == 1 else "")
            + f", got {type(item).__name__}"
        )
    missing = [f for f in fields if f not in item]
    extra = [k for k in item if k not in fields]
    if missing or extra:
        parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
        raise InputError(
            f"inputs[{i}]: {', '.join(p for p in parts if p)}; task {spec.name!r} takes exactly {list(fields)}"
        )
    wrong = [f for f in fields if not isinstance(item[f], str)]
    if wrong:
        raise InputError(f"inputs[{i}]: fields {wrong} must be strings")
    return {**item, "label": _placeholder_label(spec)}


@dataclass
class Encoded:
    """One request's inputs, tokenized and checked, ready to be batched with others of its task."""

    task: str
    rows: list[dict]
    n_choices: list[int]
    items: list[dict]
    truncated: list[int]  # indices of inputs cut to max_length
    max_length: int = 0


# ---- one registered task ----------------------------------------------------------------------------
@dataclass
class TaskEntry:
    """What a task owns: its pruned view of the backbone, prompt and head, and where it came from."""

    name: str
    path: Path
    meta: dict
    model: PromptTunedModel
    collate: object = field(repr=False)
    flop_speedup: float = 1.0

    @property
    def spec(self):
        return self.model.task

    def info(self, backbone_sha: str) -> dict:
        """What the task list shows: task, fields, labels, rate, metrics, speedup, backbone hash."""
        extra = self.meta.get("extra", {})
        return {
            "name": self.name,
            "task": self.spec.name,
            "formulation": self.spec.formulation,
            "fields": list(input_fields(self.spec)),
            "labels": None if self.spec.labels is None else list(self.spec.labels),
            "path": str(self.path),
            "ffn_widths": self.meta["ffn_widths"],
            "heads_per_layer": self.meta.get("heads_per_layer"),
            "rate": extra.get("rate"),
            "metrics": extra.get("dev"),
            "headline": extra.get("headline"),
            "speedup": _measured_speedup(self.path),
            "flop_speedup_128": round(self.flop_speedup, 3),
            "backbone": {"name_or_path": self.meta["backbone"]["name_or_path"], "sha256": backbone_sha},
        }


def _measured_speedup(path: Path):
    """The CPU speedup the training run measured, when the artifact sits in a run folder."""
    for candidate in (path.parent / "summary.json", path / "summary.json"):
        if candidate.is_file():
            try:
                summary = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            return _find_speedup(summary)
    return None


def _find_speedup(summary: dict):
    for key in ("speedup", "latency_speedup"):
        if isinstance(summary.get(key), (int, float)):
            return summary[key]
    for value in summary.values():
        if isinstance(value, dict):
            found = _find_speedup(value)
            if found is not None:
                return found
    return None


# ---- the multi-task model ---------------------------------------------------------------------------
class MultiTaskModel:
    """A dense backbone held once plus any number of skeleton artifacts registered on it."""

    def __init__(
        self,
        backbone: str,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_length: int = 128,
        truncation: str = "truncate",
        prune: bool = True,
        release_dense_ffn: bool = False,
    ):
        """`backbone` names the dense weights (as in skeleton.json); `seed` only matters for
        `tiny:` random backbones. Inputs longer than `max_length` tokens are cut (`truncate`) or
        refused (`reject`). `prune=False` runs every task on the dense backbone itself with its own
        prompt and head: the baseline a user without skeletons would serve. `release_dense_ffn`
        frees the dense FFN weights once the tasks hold their slices (they are the part no task
        shares); a later registration then reads them again from the backbone source, checked by
        hash."""
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation={truncation!r}; choose one of {TRUNCATION_POLICIES}")
        self.backbone_name = backbone
        self.seed = seed
        self.release_dense_ffn = release_dense_ffn and prune
        self.device = torch.device(device)
        self.dense = load_backbone(backbone, seed=seed).eval()
        check_adapter(self.dense)  # the family's FFN and heads are found, masked and sliced correctly
        self.sha256 = weights_hash(self.dense)
        self.dense.to(self.device)
        for p in self.dense.parameters():
            p.requires_grad_(False)
        self.tokenizer = load_tokenizer(backbone)
        self.truncation = truncation
        self.prune = prune
        self.max_length = max_length
        self.tasks: dict[str, TaskEntry] = {}
        self._lock = threading.Lock()  # registration vs registration; predictions read a snapshot
        self._dense_flops = backbone_flops(self.dense, 128)["total"]
        self._ffn_released = False
        self._dense_bytes = sum(_storages(_module_tensors(self.dense)).values())

    @classmethod
    def from_artifacts(cls, paths, *, backbone: str | None = None, **kwargs) -> MultiTaskModel:
        """Load the backbone named by the first artifact (or `backbone`) and register every path;
        with `release_dense_ffn`, the dense FFN is freed once, after the last of them."""
        paths = list(paths)
        if not paths:
            raise ValueError("pass at least one skeleton artifact or run folder")
        meta = read_meta(paths[0])
        release = kwargs.pop("release_dense_ffn", False)
        model = cls(backbone or meta["backbone"]["name_or_path"], seed=meta["model"].get("seed", 0), **kwargs)
        for path in paths:
            model.register(path)
        if release:
            model.free_dense_ffn()
        return model

    # ---- limits ----
    def model_limit(self, prompt_tokens: int) -> int:
        """Most text tokens the backbone can take next to the prompt (positions cover both)."""
        positions = getattr(self.dense.config, "max_position_embeddings", None) or 10**9
        return positions - prompt_tokens - (2 if self.dense.config.model_type == "roberta" else 0)

    # ---- registration ----
    def register(self, path: str | Path, name: str | None = None) -> TaskEntry:
        """Add a skeleton: check it, build its pruned view once, and make it servable under `name`
        (default: its task name). Other tasks are untouched."""
        path = resolve_artifact(path)
        meta = read_meta(path)
        if meta["kind"] != KIND_SKELETON:
            raise ArtifactError(f"{path} is an export with its own weights, not a skeleton of this backbone")
        expected = meta["backbone"]["sha256"]
        if expected != self.sha256:
            raise BackboneMismatchError(
                f"{path} was made from backbone {meta['backbone']['name_or_path']!r} with weights sha256 "
                f"{expected}, but this server holds {self.backbone_name!r} with sha256 {self.sha256}: "
                "serve it with the backbone it was cut from"
            )
        name = name or meta["task"]
        with self._lock:
            if name in self.tasks:
                raise ValueError(f"a task named {name!r} is already registered; unregister it first")
            self._restore_dense_ffn()
            try:
                entry = self._build(path, meta, name)
            finally:
                if self.release_dense_ffn:
                    self._release_dense_ffn()
            self.tasks = {**self.tasks, name: entry}
        return entry

    # ---- the dense FFN: needed only to cut new slices from ----
    def free_dense_ffn(self) -> None:
        """Free the dense FFN weights now and after every later registration (which re-reads them)."""
        if self.prune:
            self.release_dense_ffn = True
            with self._lock:
                self._release_dense_ffn()

    def _release_dense_ffn(self) -> None:
        """Point the dense FFN modules at empty tensors; views keep whatever slices they own."""
        for m in _ffn_modules(self.dense):
            for key in ("weight", "bias"):
                old = getattr(m, key, None)
                if old is not None:
                    empty = old.new_empty((0,) * old.dim())
                    setattr(m, key, nn.Parameter(empty, requires_grad=False))
        self._ffn_released = True

    def _restore_dense_ffn(self) -> None:
        """Read the dense FFN weights again from the backbone source, refusing other weights."""
        if not self._ffn_released:
            return
        fresh = load_backbone(self.backbone_name, seed=self.seed)
        found = weights_hash(fresh)
        if found != self.sha256:
            raise BackboneMismatchError(
                f"{self.backbone_name!r} now has weights sha256 {found}, not the {self.sha256} this server "
                "started with: it changed on disk; restart the server"
            )
        for mine, theirs in zip(_ffn_modules(self.dense), _ffn_modules(fresh.to(self.device))):
            for key in ("weight", "bias"):
                if getattr(theirs, key, None) is not None:
                    setattr(mine, key, nn.Parameter(getattr(theirs, key).detach(), requires_grad=False))
        self._ffn_released = False

    def _build(self, path: Path, meta: dict, name: str) -> TaskEntry:
        tensors = read_tensors(path / TENSORS)
        view = share_modules(self.dense) if self.prune else self.dense
        try:
            if self.prune:  # compensation replaces the view's Parameters: the dense ones stay untouched
                prune_as_saved(view, meta, tensors)
            model = PromptTunedModel(
                **{**meta["model"], "backbone": self.backbone_name}, backbone_module=view
            )
            model.load_trained_state(trained_of(tensors), source=str(path / TENSORS))
        except (KeyError, RuntimeError, ValueError, IndexError) as err:
            raise ArtifactError(f"{path} does not fit this backbone: {err}") from err
        model.to(self.device).eval()
        model.skeleton_info = meta
        speedup = self._dense_flops / max(backbone_flops(view, 128)["total"], 1)
        return TaskEntry(name, path, meta, model, collator_for(self.tokenizer, model.task), speedup)

    def unregister(self, name: str) -> None:
        """Remove a task; requests already running on it finish on the old snapshot."""
        with self._lock:
            self._entry(name)
            self.tasks = {k: v for k, v in self.tasks.items() if k != name}

    def _entry(self, name: str) -> TaskEntry:
        entry = self.tasks.get(name)
        if entry is None:
            loaded = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTaskError(f"unknown task {name!r}; loaded tasks: {loaded}")
        return entry

    # ---- prediction ----
    def encode(self, task: str, inputs) -> Encoded:
        """Check and tokenize one request's inputs (cheap; a batch then only pads and runs)."""
        entry = self._entry(task)
        if not isinstance(inputs, list) or not inputs:
            raise InputError("inputs must be a non-empty list")
        spec, fields = entry.spec, input_fields(entry.spec)
        rows = [_as_row(spec, fields, item, i) for i, item in enumerate(inputs)]
        try:
            examples = [spec.convert(row) for row in rows]
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"inputs do not fit task {spec.name!r}: {err}") from err
        max_length = min(self.max_length, self.model_limit(entry.model.prompt.num_tokens))
        dataset = TokenizedSplit(tokenize(examples, self.tokenizer, max_length))
        truncated = self._truncated(examples, dataset, max_length)
        if truncated and self.truncation == "reject":
            raise InputError(
                f"inputs {truncated} are longer than {max_length} tokens (the server refuses long inputs; "
                "shorten them or start it with --truncation truncate)"
            )
        items = [dataset[i] for i in range(len(dataset))]
        return Encoded(task, rows, [len(ex.texts) for ex in examples], items, truncated, max_length)

    def _truncated(self, examples, dataset: TokenizedSplit, max_length: int) -> list[int]:
        """Inputs the tokenizer cut; only rows that came out exactly `max_length` long are re-checked."""
        lengths = dataset.t["row_lengths"].tolist()
        out, row = [], 0
        for i, ex in enumerate(examples):
            for a, b in ex.texts:
                if lengths[row] == max_length:
                    full = self.tokenizer(a, b, truncation=False, verbose=False)["input_ids"]
                    if len(full) > max_length and i not in out:
                        out.append(i)
                row += 1
        return out

    @torch.inference_mode()
    def run(self, task: str, requests: list[Encoded]) -> list[list[dict]]:
        """One forward pass over several requests of one task; a record list per request."""
        entry = self._entry(task)
        items = [it for r in requests for it in r.items]
        batch = entry.collate(items)
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = entry.model(batch).float().cpu()
        out, start = [], 0
        for r in requests:
            chunk = logits[start : start + len(r.items)]
            start += len(r.items)
            out.append(
                [
                    _record(entry.spec, i, row, c, lg)
                    for i, (row, c, lg) in enumerate(zip(r.rows, r.n_choices, chunk))
                ]
            )
        return out

    def predict(self, task: str, inputs) -> list[dict]:
        """Predictions for one task's inputs: label name (or value, for regression) and raw scores."""
        return self.run(task, [self.encode(task, inputs)])[0]

    # ---- memory ----
    def memory(self) -> dict:
        """Tensor bytes: the shared backbone, each task's own part, and the totals against N separate
        pruned models and N dense models (each with its prompt and head)."""
        shared = _storages(_module_tensors(self.dense))
        tasks, pruned_alone, resident = {}, 0, dict(shared)
        for name, entry in self.tasks.items():
            own = _storages(_module_tensors(entry.model))
            tasks[name] = sum(b for ptr, b in own.items() if ptr not in shared)
            pruned_alone += sum(own.values())
            resident.update(own)
        trained = sum(sum(_storages([*e.model.prompt.parameters(), *e.model.head.parameters()]).values())
                      for e in self.tasks.values())  # fmt: skip
        dense = self._dense_bytes
        return {
            "shared_bytes": sum(shared.values()),
            "task_bytes": tasks,
            "total_bytes": sum(resident.values()),  # each storage once
            "separate_pruned_bytes": pruned_alone,
            "separate_dense_bytes": len(self.tasks) * dense + trained,
            "dense_model_bytes": dense,
            "dense_ffn_released": self._ffn_released,
        }


def _record(spec, index: int, row: dict, n_choices: int, logits: torch.Tensor) -> dict:
    """prediction_record's answer under request-friendly names, with the scores unrounded."""
    base = prediction_record(spec, index, row, n_choices, logits)
    scores = logits[:n_choices] if spec.formulation == "multiple_choice" else logits.reshape(-1)
    record = {"index": index}
    if spec.formulation == "regression":
        record["value"] = base["prediction"]
    else:
        record["label"] = base["prediction"]
    record["scores"] = [float(s) for s in scores]
    return record
