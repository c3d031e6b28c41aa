"""Data for one GLUE/SuperGLUE task: local official files or the hub, a search split carved from train,
a token cache on disk, and a dynamic-padding collate shared by single-input and multiple-choice tasks.

Splits: `train_dataloader` is train minus the search split; `val_dataloader` (= `search_dataloader`) is
the search split, used for early stopping and pruning decisions; `test_dataloader` (= `dev_dataloader`)
is the official dev/val set, used only for reporting (GLUE/SuperGLUE test labels are hidden).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import PreTrainedTokenizerBase

from skeleton.backbones import load_tokenizer
from skeleton.tasks import Example, TaskSpec, get_task, read_split

CACHE_VERSION = 1  # bump when tokenization or the converters change meaning
SOURCES = ("auto", "local", "hub")
# Where the search split comes from. "train" (default): dev stays untouched for reporting. "dev": the
# search split is a seeded part of dev and only the rest of dev is reported: the usual protocol when
# train and dev differ in kind (SST-2 train is mostly short phrases, its dev set full sentences).
SEARCH_FROM = ("train", "dev")
ENV_DIRS = {"glue": "GLUE_DIR", "superglue": "SUPERGLUE_DIR"}
SUBFOLDERS = {"glue": ("glue", "glue_data"), "superglue": ("superglue", "super_glue")}
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
        ", ".join(map(str, candidates)) if candidates else f"nothing (data_dir is None and {env} is unset)"
    )
    raise FileNotFoundError(
        f"{spec.name}: no local {split} file {spec.folder}/{spec.files[split]}; searched {searched}. "
        f"Fix: pass data_dir=/path/to/data (a folder holding glue/ and superglue/, or the {spec.benchmark} "
        f"folder itself) or set {env}; {DOWNLOAD[spec.benchmark]}; or run online with source='hub'."
    )


def load_hub(spec: TaskSpec, split: str, local_error: Exception | None = None):
    """The hub mirror of one split, or a FileNotFoundError that says what was tried and how to fix it."""
    import datasets  # only for hub data: a local folder never needs it

    hub_split = spec.hub_splits[split]
    try:
        return datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split)
    except Exception as e:
        tried = f"{local_error} Also " if local_error else ""
        raise FileNotFoundError(
            f"{tried}{spec.name}: could not load {spec.hub_id} ({spec.hub_config}, split {hub_split}) from "
            f"the Hugging Face hub: {type(e).__name__}: {e}. Fix: run online (unset HF_DATASETS_OFFLINE) "
            f"or use local files via data_dir= / {ENV_DIRS[spec.benchmark]}."
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

    def examples(self) -> list[Example]:
        rows = read_split(self.spec, self.path) if self.path is not None else self.dataset
        return [self.spec.convert(row) for row in rows]


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
        """Load + tokenize what `stage` needs, once. test/predict need only dev; everything else also
        needs train, which the search split is carved from."""
        self.split("dev")
        if stage not in ("test", "predict"):
            self.split("train")

    def split(self, name: str) -> TokenizedSplit:
        """A whole tokenized split ("train", "dev", or an extra one like "dev_mismatched"), from the
        cache when the (task, split, tokenizer, max_length, source) key matches."""
        if name not in self.splits:
            raw = locate(self.task, name, self.data_dir, self.source)
            self.splits[name] = TokenizedSplit(self._tokenized(name, raw))
            if name == "train":
                self._carve_search_split()
            if name == "dev" and self.search_from == "dev":  # search on part of dev, report the rest
                search, report = self._carve(len(self.splits["dev"]), from_here=True)
                self.dev_search_indices, self.dev_report_indices = search.sort().values, report.sort().values
        return self.splits[name]

    def cache_path(self, name: str, raw: RawSplit) -> Path:
        if self._tokenizer_fp is None:
            self._tokenizer_fp = tokenizer_fingerprint(self.tokenizer)
        key = [CACHE_VERSION, self.task.name, name, self._tokenizer_fp, self.max_length]
        digest = hashlib.sha256(json.dumps([*key, raw.fingerprint]).encode()).hexdigest()[:20]
        return self.cache_dir / "tokenized" / f"{self.task.name}-{name}-{digest}.safetensors"

    def _tokenized(self, name: str, raw: RawSplit) -> dict[str, Tensor]:
        path = self.cache_path(name, raw)
        if path.is_file():
            return load_file(path)
        tensors = tokenize(raw.examples(), self.tokenizer, self.max_length)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(tensors, tmp, metadata={"task": self.task.name, "split": name, "source": raw.fingerprint})
        os.replace(tmp, path)  # atomic: concurrent runs never read a half-written cache
        return tensors

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
