"""Data for one GLUE/SuperGLUE task: local official files or the hub, a search split carved from train,
a token cache on disk, and a dynamic-padding collate shared by single-input and multiple-choice tasks.

Splits: `train_dataloader` is train minus the search split; `val_dataloader` (= `search_dataloader`) is
the search split, used for early stopping and pruning decisions; `test_dataloader` (= `dev_dataloader`)
is the official dev/val set, used only for reporting (GLUE/SuperGLUE test labels are hidden).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import PreTrainedTokenizerBase

from skeleton.backbones import load_tokenizer
from skeleton.tasks import DataFormatError, Example, TaskSpec, get_task, read_split

CACHE_VERSION = 2  # bump when tokenization, the converters or the cache's metadata change meaning
log = logging.getLogger("skeleton.data")
SOURCES = ("auto", "local", "hub")
# Where the search split comes from. "train" (default): dev stays untouched for reporting. "dev": the
# search split is a seeded part of dev and only the rest of dev is reported: the usual protocol when
# train and dev differ in kind (SST-2 train is mostly short phrases, its dev set full sentences).
SEARCH_FROM = ("train", "dev")
ENV_DIRS = {"glue": "GLUE_DIR", "superglue": "SUPERGLUE_DIR"}
SUBFOLDERS = {"glue": ("glue", "glue_data"), "superglue": ("superglue", "super_glue")}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
DOWNLOAD = {
    "glue": "download GLUE with the official download_glue_data.py (it writes glue_data/<TASK>/)",
    "superglue": "download SuperGLUE from https://super.gluebenchmark.com/tasks (unzip to <dir>/<TASK>/)",
}


# ---- locating and loading raw rows -----------------------------------------------------------------
def local_candidates(spec: TaskSpec, split: str, data_dir: str | Path | None = None) -> list[Path]:
    """Where the official file of `split` may be: under a benchmark root (<root>/glue/SST-2/...), in a
    benchmark folder (<dir>/SST-2/...) or in the task folder itself. data_dir wins over the env vars."""
    root = data_dir or os.environ.get(ENV_DIRS[spec.benchmark])
    if not root:
        return []
    root, name = Path(root).expanduser(), spec.files[split]
    folders = [root / sub / spec.folder for sub in SUBFOLDERS[spec.benchmark]] + [root / spec.folder, root]
    return [folder / name for folder in folders]


def find_local(spec: TaskSpec, split: str, data_dir: str | Path | None = None) -> Path:
    if split not in spec.files:
        raise FileNotFoundError(f"{spec.name} has no {split!r} split; it has: {', '.join(spec.files)}")
    candidates = local_candidates(spec, split, data_dir)
    for path in candidates:
        if path.is_file():
            return path
    env = ENV_DIRS[spec.benchmark]
    searched = (
        ", ".join(map(str, candidates))
        if candidates
        else f"nothing (paths.data_dir is null and {env} is unset)"
    )
    raise FileNotFoundError(
        f"{spec.name}: no local {split} file {spec.folder}/{spec.files[split]}; searched {searched}. "
        f"Fix: pass paths.data_dir=/path/to/folder-with-glue-and-superglue (or the {spec.benchmark} folder "
        f"itself; SKELETON_DATA sets the same) or set {env}; {DOWNLOAD[spec.benchmark]}; "
        f"or run online with data.source=hub."
    )


def offline_vars() -> list[str]:
    """The set offline switches: with any of them, a dataset missing from the local cache cannot load."""
    return [v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]


def load_hub(spec: TaskSpec, split: str, local_error: Exception | None = None):
    """The hub mirror of one split, or a FileNotFoundError that says what was tried and how to fix it."""
    import datasets  # only for hub data: a local folder never needs it

    hub_split = spec.hub_splits[split]
    try:
        return datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split)
    except Exception as e:
        tried = f"{local_error} Also " if local_error else ""
        offline = offline_vars()
        why = (
            f"the hub is offline ({' and '.join(offline)} set) and the local datasets cache does not hold it "
            f"({type(e).__name__}: {e})"
            if offline
            else f"{type(e).__name__}: {e}"
        )
        raise FileNotFoundError(
            f"{tried}{spec.name}: could not load {spec.hub_id} ({spec.hub_config}, split {hub_split}) from "
            f"the Hugging Face hub: {why}. Fix: run online (unset {' and '.join(offline or OFFLINE_VARS)} on a "
            f"machine with network) or use local files via paths.data_dir=/path/to/folder-with-glue-and-superglue "
            f"(or {ENV_DIRS[spec.benchmark]}) with data.source=local."
        ) from e


@dataclass
class RawSplit:
    """One split before conversion: where it came from (a local file or a hub dataset) and a
    fingerprint that changes whenever its content may have."""

    spec: TaskSpec
    path: Path | None = None
    dataset: object | None = None

    @property
    def fingerprint(self) -> str:
        if self.path is not None:
            st = self.path.stat()
            return f"local:{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        return f"hub:{self.spec.hub_id}:{self.spec.hub_config}:{self.dataset._fingerprint}"

    @property
    def origin(self) -> str:
        """Where the split was read from, for error messages."""
        if self.path is not None:
            return str(self.path)
        return f"hub {self.spec.hub_id} ({self.spec.hub_config})"

    def examples(self) -> list[Example]:
        if self.path is not None:
            return [self.spec.convert(row) for row in read_split(self.spec, self.path)]
        self._check_hub_fields()
        return [self.spec.convert(row) for row in self.dataset]

    def _check_hub_fields(self) -> None:
        """A hub dataset without the spec's fields would fail in the converter with a bare KeyError."""
        columns = getattr(self.dataset, "column_names", None)
        needed = self.spec.fields or tuple(f for f in self.spec.columns or {} if f != "label")
        missing = [f for f in needed if columns is not None and f not in columns]
        if missing:
            raise DataFormatError(
                f"{self.origin}: missing field(s) {missing} for {self.spec.name}; it has {columns}. "
                f"Fix: check the dataset id and config, or use the official files with paths.data_dir="
            )


def locate(spec: TaskSpec, split: str, data_dir=None, source: str = "auto") -> RawSplit:
    """source='auto' reads local files when present and falls back to the hub."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    local_error = None
    if source != "hub":
        try:
            return RawSplit(spec, path=find_local(spec, split, data_dir))
        except FileNotFoundError as e:
            if source == "local" or split not in spec.files:
                raise
            local_error = e
    return RawSplit(spec, dataset=load_hub(spec, split, local_error))


# ---- tokenization and its cache --------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """Name/path plus a hash of the full tokenizer definition (tokenizer.json for fast tokenizers, the
    vocab otherwise), minus the truncation/padding state that every call mutates."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        state = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, tokenizer.name_or_path, state], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize(examples: list[Example], tokenizer, max_length: int, chunk: int = 2048) -> dict[str, Tensor]:
    """Examples -> flat tensors (no padding): every choice of every example is one row, choice-major.
    input_ids / token_type_ids are the rows' tokens concatenated; row_lengths and num_choices index them."""
    pairs = [t for ex in examples for t in ex.texts]
    ids, types = [], []
    for i in range(0, len(pairs), chunk):
        a, b = zip(*pairs[i : i + chunk])
        if any(x is None for x in b) and not all(x is None for x in b):
            raise ValueError("a task must give every row a text_b or none")
        enc = tokenizer(list(a), None if b[0] is None else list(b), truncation=True, max_length=max_length)
        ids += enc["input_ids"]
        types += enc.get("token_type_ids") or []
    regression = any(isinstance(ex.label, float) for ex in examples)
    out = {
        "input_ids": torch.tensor([t for row in ids for t in row], dtype=torch.int32),
        "row_lengths": torch.tensor([len(row) for row in ids], dtype=torch.int32),
        "num_choices": torch.tensor([len(ex.texts) for ex in examples], dtype=torch.int32),
        "labels": torch.tensor(
            [ex.label for ex in examples], dtype=torch.float32 if regression else torch.int64
        ),
    }
    if types:
        out["token_type_ids"] = torch.tensor([t for row in types for t in row], dtype=torch.uint8)
    if examples and examples[0].group is not None:
        out["group"] = torch.tensor([ex.group for ex in examples], dtype=torch.int64)
    if examples and examples[0].candidate_scores is not None:
        scores = [s for ex in examples for s in ex.candidate_scores]
        out["candidate_scores"] = torch.tensor(scores, dtype=torch.float32).reshape(-1, 2)
    return out


def count_truncated(
    examples: list[Example], tokenizer, max_length: int, tensors: dict[str, Tensor], chunk: int = 2048
) -> int:
    """Examples with at least one row that `tokenize` cut. Only rows that came out exactly max_length
    long can have been cut, so only those are tokenized again, without truncation, to tell."""
    full = (tensors["row_lengths"] >= max_length).nonzero().flatten().tolist()
    if not full:
        return 0
    pairs = [t for ex in examples for t in ex.texts]
    owner = torch.repeat_interleave(torch.arange(len(examples)), tensors["num_choices"].long())
    cut: set[int] = set()
    for i in range(0, len(full), chunk):
        rows = full[i : i + chunk]
        a, b = zip(*(pairs[r] for r in rows))
        enc = tokenizer(list(a), None if b[0] is None else list(b), truncation=False, verbose=False)
        cut.update(int(owner[r]) for r, ids in zip(rows, enc["input_ids"]) if len(ids) > max_length)
    return len(cut)


def read_cache(path: Path) -> tuple[dict[str, Tensor], int] | None:
    """A cached split and its truncation count, or None to rebuild it: it is only a cache, so an
    unreadable file (a full disk, a copy cut short) costs one tokenization, not the run."""
    try:
        with safe_open(path, "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (OSError, SafetensorError) as err:
        log.warning(f"rebuilding the unreadable token cache {path} ({type(err).__name__}: {err})")
        return None
    return (tensors, int(meta["truncated"])) if "truncated" in meta else None


class EmptySplitError(ValueError):
    """A split that the run needs holds no examples: caught at setup, not at the end of a long run."""


class TokenizedSplit(Dataset):
    """A tokenized split; item i is example i with one token row per choice."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.t = tensors
        zero = torch.zeros(1, dtype=torch.int64)
        self.row_start = torch.cat([zero, tensors["row_lengths"].long().cumsum(0)])
        self.choice_start = torch.cat([zero, tensors["num_choices"].long().cumsum(0)])

    def __len__(self) -> int:
        return len(self.t["labels"])

    def __getitem__(self, i: int) -> dict:
        r0, r1 = int(self.choice_start[i]), int(self.choice_start[i + 1])
        bounds = [(int(self.row_start[r]), int(self.row_start[r + 1])) for r in range(r0, r1)]
        item = {"input_ids": [self.t["input_ids"][s:e] for s, e in bounds], "labels": self.t["labels"][i]}
        if "token_type_ids" in self.t:
            item["token_type_ids"] = [self.t["token_type_ids"][s:e] for s, e in bounds]
        if "group" in self.t:
            item["group"] = self.t["group"][i]
        if "candidate_scores" in self.t:
            item["candidate_scores"] = self.t["candidate_scores"][r0:r1]
        return item


def example_lengths(dataset: TokenizedSplit, indices: Tensor) -> Tensor:
    """Longest token row of each example (over its choices)."""
    rows = dataset.t["row_lengths"].long()
    starts, ends = dataset.choice_start[indices], dataset.choice_start[indices + 1]
    return torch.tensor([int(rows[a:b].max()) for a, b in zip(starts.tolist(), ends.tolist())])


@dataclass
class Collator:
    """Pads to the longest row in the batch. Rows are flattened to (B*C, L), choice-major within an
    example; examples with fewer than C choices get `empty_row` ([CLS][SEP]) rows, masked out by
    `choice_mask` (B, C), which multiple-choice batches always carry."""

    pad_id: int
    empty_row: list[int]
    multiple_choice: bool = False

    def __call__(self, items: list[dict]) -> dict:
        num_choices = max(len(it["input_ids"]) for it in items)
        choice_mask = torch.zeros(len(items), num_choices, dtype=torch.bool)
        empty = torch.tensor(self.empty_row, dtype=torch.int32)
        rows, types = [], []
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            choice_mask[b, :n] = True
            rows += it["input_ids"] + [empty] * (num_choices - n)
            if "token_type_ids" in it:
                types += it["token_type_ids"] + [torch.zeros_like(empty)] * (num_choices - n)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        token_type_ids = torch.zeros(len(rows), length, dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = row
            attention_mask[r, : len(row)] = 1
            if types:
                token_type_ids[r, : len(row)] = types[r]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "num_choices": num_choices,
            "labels": torch.stack([it["labels"] for it in items]),
        }
        if types:
            batch["token_type_ids"] = token_type_ids
        if self.multiple_choice:
            batch["choice_mask"] = choice_mask
        if "group" in items[0]:
            batch["group"] = torch.stack([it["group"] for it in items])
        if "candidate_scores" in items[0]:
            scores = torch.zeros(len(items), num_choices, 2)
            for b, it in enumerate(items):
                scores[b, : len(it["candidate_scores"])] = it["candidate_scores"]
            batch["candidate_scores"] = scores
        return batch


def collator_for(tokenizer, spec: TaskSpec) -> Collator:
    """The collate function for `spec`'s batches: the tokenizer's pad id and its empty input as filler."""
    empty = tokenizer("")["input_ids"] or [tokenizer.pad_token_id]
    return Collator(tokenizer.pad_token_id or 0, empty, spec.formulation == "multiple_choice")


# ---- the data module -------------------------------------------------------------------------------
def check_numbers(**settings) -> None:
    """Sizes must be numbers in range; counts of 0 are refused at setup, which knows the split sizes."""
    minimum = {"max_length": 1, "batch_size": 1, "eval_batch_size": 1}
    for key, value in settings.items():
        if value is None and key.startswith("max_") and key != "max_length":
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        integral = key == "search_size" or isinstance(value, int)
        low = minimum.get(key, 0)
        if not number or not integral or value < low:
            kind = "a count or a fraction" if key == "search_size" else "an integer"
            null = " or null" if key.startswith("max_") and key != "max_length" else ""
            raise ValueError(f"data.{key}={value!r} is invalid; allowed: {kind} >= {low}{null}")


class TaskDataModule(L.LightningDataModule):
    """One task's splits as DataLoaders. See the module docstring for which split serves what."""

    def __init__(
        self,
        task: str | TaskSpec,
        tokenizer: str | PreTrainedTokenizerBase,
        data_dir: str | None = None,
        source: str = "auto",
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        search_size: float | int = 0.1,
        search_max: int = 1000,
        search_from: str = "train",
        attribution_size: int = 512,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if search_from not in SEARCH_FROM:
            raise ValueError(f"data.search_from must be one of {SEARCH_FROM}, got {search_from!r}")
        self.search_from = search_from
        check_numbers(max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
                      search_size=search_size, search_max=search_max, attribution_size=attribution_size,
                      max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)  # fmt: skip
        self.task: TaskSpec = get_task(task)
        # a name/path, or an already loaded tokenizer (saves a reload when the caller has one)
        loaded = not isinstance(tokenizer, (str, os.PathLike))
        self.tokenizer_name = tokenizer.name_or_path if loaded else str(tokenizer)
        self.data_dir, self.source, self.max_length = data_dir, source, max_length
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.search_size, self.search_max, self.attribution_size = search_size, search_max, attribution_size
        self.max_train_samples, self.max_eval_samples, self.seed = max_train_samples, max_eval_samples, seed
        default_cache = os.environ.get("SKELETON_CACHE") or Path.home() / ".cache" / "skeleton"
        self.cache_dir = Path(cache_dir or default_cache).expanduser()
        self._tokenizer, self._tokenizer_fp = (tokenizer if loaded else None), None
        self.splits: dict[str, TokenizedSplit] = {}
        self.origins: dict[str, str] = {}  # split -> the file or hub dataset it was read from
        self.truncated: dict[str, tuple[int, int]] = {}  # split -> (inputs cut by max_length, inputs)
        self.train_indices: Tensor | None = None
        self.search_indices: Tensor | None = None
        self.dev_search_indices: Tensor | None = None
        self.dev_report_indices: Tensor | None = None

    # -- loading ----------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Load + tokenize what `stage` needs, once, then check it (see `validate`). test/predict need
        only dev; everything else also needs train, which the search split is carved from."""
        self.split("dev")
        if stage not in ("test", "predict"):
            self.split("train")
        self.check(stage)

    def validate(self, stage: str | None = "fit") -> None:
        """Load what `stage` needs and fail now if a split it serves is empty or the tokenizer cannot
        take max_length: the training entry point calls this before it builds the model and Trainer."""
        self.setup(stage)

    def check(self, stage: str | None = None) -> None:
        """Raise, naming the setting to change, for any split the stage would serve empty: an empty
        train or search split fails in the first step, an empty dev set only after the whole run."""
        self._check_tokenizer()
        if stage not in ("test", "predict"):
            self._check_train()
            self._check_search()
        self._check_dev()

    def split(self, name: str) -> TokenizedSplit:
        """A whole tokenized split ("train", "dev", or an extra one like "dev_mismatched"), from the
        cache when the (task, split, tokenizer, max_length, source) key matches."""
        if name not in self.splits:
            raw = locate(self.task, name, self.data_dir, self.source)
            self.origins[name] = raw.origin
            self.splits[name] = TokenizedSplit(self._tokenized(name, raw))
            self._report_truncated(name)
            if name == "train":
                self._carve_search_split()
            if name == "dev" and self.search_from == "dev":  # search on part of dev, report the rest
                search, report = self._carve(len(self.splits["dev"]), from_here=True)
                self.dev_search_indices, self.dev_report_indices = search.sort().values, report.sort().values
        return self.splits[name]

    def _check_tokenizer(self) -> None:
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000 and self.max_length > limit:
            raise ValueError(
                f"data.max_length={self.max_length} exceeds what the tokenizer {self.tokenizer_name} takes "
                f"(model_max_length={limit}); allowed: 1..{limit}"
            )

    def _empty(self, split: str, what: str, fix: str) -> EmptySplitError:
        return EmptySplitError(f"{self.task.name}: the {split} split is empty: {what}. Fix: {fix}")

    def _check_train(self) -> None:
        n, origin = len(self.splits["train"]), self.origins["train"]
        if n == 0:
            raise self._empty("train", f"{origin} has no examples", "use a complete copy of the train data")
        if len(self.train_indices) == 0:
            if self.max_train_samples == 0:
                raise self._empty(
                    "train", "data.max_train_samples=0", "set a positive count, or null for all"
                )
            raise self._empty(
                "train",
                f"the search split takes all {n} examples of {origin} (data.search_size={self.search_size}, "
                f"data.search_max={self.search_max})",
                "lower data.search_size, or search on dev with data.search_from=dev",
            )

    def _check_search(self) -> None:
        """The search split drives early stopping and the margin search."""
        source = "dev" if self.search_from == "dev" else "train"
        indices = self.dev_search_indices if source == "dev" else self.search_indices
        if len(indices[: self.max_eval_samples]) > 0:
            return
        n, origin = len(self.splits[source]), self.origins[source]
        if self.max_eval_samples == 0:
            what, fix = "data.max_eval_samples=0", "set a positive count, or null for all"
        elif self.search_max == 0:
            what, fix = "data.search_max=0", "set data.search_max to a positive count"
        else:
            what = f"data.search_size={self.search_size} of the {n} examples of {origin} rounds to 0"
            if source == "dev":
                what += " (data.search_from=dev on a small dev set)"
            fix = "raise data.search_size (a count such as 100, or a larger fraction)"
        raise self._empty("search", what, fix)

    def _check_dev(self) -> None:
        """The reported split: every score of the run's summary is measured on it."""
        n, origin = len(self.splits["dev"]), self.origins["dev"]
        indices = self.dev_report_indices if self.dev_report_indices is not None else torch.arange(n)
        if len(indices[: self.max_eval_samples]) > 0:
            return
        if n == 0:
            raise self._empty("dev", f"{origin} has no examples", "use a complete copy of the dev data")
        if self.max_eval_samples == 0:
            raise self._empty("dev", "data.max_eval_samples=0", "set a positive count, or null for all")
        raise self._empty(
            "dev",
            f"data.search_from=dev with data.search_size={self.search_size} takes all {n} examples of "
            f"{origin} for the search split, leaving none to report",
            "lower data.search_size, or use data.search_from=train",
        )

    def cache_path(self, name: str, raw: RawSplit) -> Path:
        if self._tokenizer_fp is None:
            self._tokenizer_fp = tokenizer_fingerprint(self.tokenizer)
        key = [CACHE_VERSION, self.task.name, name, self._tokenizer_fp, self.max_length]
        digest = hashlib.sha256(json.dumps([*key, raw.fingerprint]).encode()).hexdigest()[:20]
        return self.cache_dir / "tokenized" / f"{self.task.name}-{name}-{digest}.safetensors"

    def _tokenized(self, name: str, raw: RawSplit) -> dict[str, Tensor]:
        """Tensors from the cache, or tokenized and cached with the truncation count in the metadata,
        so a cache hit reports it too."""
        path = self.cache_path(name, raw)
        cached = read_cache(path) if path.is_file() else None
        if cached is not None:
            tensors, cut = cached
            self.truncated[name] = (cut, len(tensors["labels"]))
            return tensors
        examples = raw.examples()
        tensors = tokenize(examples, self.tokenizer, self.max_length)
        cut = count_truncated(examples, self.tokenizer, self.max_length, tensors)
        self.truncated[name] = (cut, len(examples))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        meta = {"task": self.task.name, "split": name, "source": raw.fingerprint, "truncated": str(cut)}
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # atomic: concurrent runs never read a half-written cache
        return tensors

    def _report_truncated(self, name: str) -> None:
        cut, total = self.truncated.get(name, (0, 0))
        if cut:
            log.warning(
                f"{name}: {cut:,} of {total:,} inputs longer than data.max_length={self.max_length} tokens "
                f"are truncated (raise data.max_length to keep them)"
            )

    def _carve_search_split(self) -> None:
        """Hold out the search split from train: a seeded permutation's first k examples, k a fraction
        (float < 1) or a count, capped at search_max. It depends only on (len(train), seed, sizes)."""
        search, rest = self._carve(len(self.splits["train"]), from_here=self.search_from == "train")
        rest = rest if self.max_train_samples is None else rest[: self.max_train_samples]
        self.train_indices, self.search_indices = rest.sort().values, search.sort().values

    def _carve(self, n: int, from_here: bool) -> tuple[Tensor, Tensor]:
        """A seeded permutation of n examples split into (search, rest)."""
        size = self.search_size
        k = round(size * n) if isinstance(size, float) and size < 1 else int(size)
        k = max(0, min(k, self.search_max, n)) if from_here else 0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[:k], perm[k:]

    # -- loaders ----------------------------------------------------------------------------------
    @property
    def collator(self) -> Collator:
        return collator_for(self.tokenizer, self.task)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=self.collator, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)  # fmt: skip

    def _eval_subset(self, dataset: Dataset, indices=None) -> Subset:
        """Evaluation order sorted by length: batches pad less, and the margin search evaluates often."""
        indices = torch.arange(len(dataset)) if indices is None else indices
        indices = indices[: self.max_eval_samples]
        return Subset(
            dataset, indices[torch.argsort(example_lengths(dataset, indices), stable=True)].tolist()
        )

    def train_dataloader(self) -> DataLoader:
        train = self.split("train")
        return self._loader(Subset(train, self.train_indices.tolist()), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The search split (held out from train, or from dev with search_from=dev): early stopping
        and pruning decisions."""
        if self.search_from == "dev":
            return self._loader(
                self._eval_subset(self.split("dev"), self.dev_search_indices), self.eval_batch_size
            )
        train = self.split("train")
        return self._loader(self._eval_subset(train, self.search_indices), self.eval_batch_size)

    search_dataloader = val_dataloader

    def test_dataloader(self) -> DataLoader:
        """The official dev/val set (MNLI: matched), for reporting only; with search_from=dev, the part
        of it that the search never saw."""
        dev = self.split("dev")
        return self._loader(self._eval_subset(dev, self.dev_report_indices), self.eval_batch_size)

    dev_dataloader = test_dataloader

    def eval_dataloader(self, split: str) -> DataLoader:
        """Any other official split in file order, e.g. MNLI's "dev_mismatched"."""
        return self._loader(self._eval_subset(self.split(split)), self.eval_batch_size)

    def attribution_dataloader(self, n: int | None = None) -> DataLoader:
        """First n (default attribution_size) examples of a seeded permutation of the train part, in a
        fixed order: the examples that neuron attribution scores."""
        train = self.split("train")
        n = self.attribution_size if n is None else n
        perm = torch.randperm(len(self.train_indices), generator=torch.Generator().manual_seed(self.seed + 1))
        return self._loader(Subset(train, self.train_indices[perm[:n]].tolist()), self.eval_batch_size)
