"""Decoders and the verbalizer head: padding-proof positions and pooling, label-word scores that are the
LM's own, pruned == masked, exact artifact reloads, and settings refused before any training."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, Conv1D

from skeleton.backbones import MissingLMHeadError, ensure_pad_token, load_tokenizer, tiny_config
from skeleton.export import ArtifactError, export_pruned, load_skeleton, save_skeleton
from skeleton.localize import masked, prune_ffn, prune_heads, score_neurons, select_heads, select_neurons
from skeleton.prompt import PromptTunedModel
from skeleton.tasks import TASKS, get_task
from skeleton.verbalizer import (
    DEFAULTS,
    VerbalizerConfig,
    VerbalizerError,
    VerbalizerHead,
    check_head,
    insert_suffix,
)
from tests.helpers import compose_config
from tests.tiny_models import one_thread  # noqa: F401  (one intra-op thread for this module)

DECODERS = ["gpt2", "llama", "qwen2", "mistral"]
TEXTS = ["a gripping , beautifully acted film", "dull", "it never quite finds its rhythm , sadly"]


def loud(model: PromptTunedModel, seed: int = 0) -> PromptTunedModel:
    """Weights of std 0.3 (biases too): with the default 0.02 a tiny model's outputs barely depend on
    positions or neurons, and an equality test could not tell right from wrong."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding)):
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def lm_folder(path, family: str) -> str:
    """A local folder holding a loud tiny LM with its head (and the tiny models' tokenizer), as an
    offline cluster would hold a real one: a skeleton made from it reloads from it by hash."""
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    lm = auto.from_config(tiny_config(family, 30522))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding)):
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    lm.save_pretrained(path)
    load_tokenizer("tiny:bert").save_pretrained(path)
    return str(path)


def make(family: str, task: str = "sst2", head: str = "verbalizer", **kw) -> PromptTunedModel:
    model = PromptTunedModel(
        backbone=f"tiny:{family}", task=task, prompt={"num_tokens": 3}, head=head, pooling="auto", **kw
    )
    return loud(model)


def encode(texts, padding_side: str = "right") -> dict:
    """A batch of the tiny models' (BERT WordPiece) tokens, padded on either side."""
    rows = [load_tokenizer("tiny:bert")(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        ids[r, span], mask[r, span] = torch.tensor(row), 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "num_choices": 1,
        "labels": torch.tensor([1, 0, 0][: len(rows)]),
    }


def logits(model, batch):
    with torch.no_grad():
        return model(batch)


# ---- decoders: defaults, padding, positions ----------------------------------------------------------
@pytest.mark.parametrize("family,expected", [(f, "last") for f in DECODERS] + [("bert", "first")])
def test_auto_pooling_reads_the_last_token_of_decoders(family, expected):
    model = PromptTunedModel(backbone=f"tiny:{family}", task="sst2", prompt={"num_tokens": 2}, pooling="auto")
    assert model.hparams.pooling == expected


@pytest.mark.parametrize("head", ["linear", "verbalizer"])
@pytest.mark.parametrize("family", DECODERS)
def test_decoder_predictions_do_not_depend_on_padding(family, head):
    """Left- or right-padded, alone or in a batch: each example gets the same scores."""
    model = make(family, head=head)
    right, left = logits(model, encode(TEXTS)), logits(model, encode(TEXTS, "left"))
    assert torch.allclose(left, right, atol=1e-5)
    for i, text in enumerate(TEXTS):
        assert torch.allclose(logits(model, encode([text]))[0], right[i], atol=1e-5)
    model._positions = (
        False  # control: without position ids counted over real tokens, left padding moves them
    )
    assert not torch.allclose(logits(model, encode(TEXTS, "left")), right, atol=1e-3)


def test_first_and_last_pooling_find_real_tokens_whatever_the_padding_side():
    model = make("bert", head="linear")
    batch, left = encode(TEXTS), encode(TEXTS, "left")
    hidden, hidden_left = model.encode(batch), model.encode(left)
    n = model.prompt.num_tokens
    lengths = batch["attention_mask"].sum(1)
    for pooling in ("first", "last"):
        model.hparams.pooling = pooling
        pooled = model.pool(hidden, batch)
        index = torch.zeros_like(lengths) if pooling == "first" else lengths - 1
        assert torch.equal(pooled, hidden[torch.arange(3), n + index])
        width = left["attention_mask"].shape[1]
        left_index = width - lengths + index
        assert torch.equal(model.pool(hidden_left, left), hidden_left[torch.arange(3), n + left_index])


def test_a_tokenizer_without_pad_token_borrows_one_and_pads_right():
    tok = load_tokenizer("tiny:bert")
    tok.pad_token, tok.padding_side = None, "left"
    tok = ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token or tok.pad_token == tok.unk_token
    assert tok.pad_token is not None and tok.padding_side == "right"


# ---- the template and the label words ------------------------------------------------------------------
@pytest.mark.parametrize("before_last", [False, True])
def test_insert_suffix_goes_after_the_text_on_either_padding_side(before_last):
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 8, 9]])  # right-padded row, left-padded row
    mask = (ids > 0).long()
    out = insert_suffix({"input_ids": ids, "attention_mask": mask}, torch.tensor([1, 2]), before_last, 1)
    if before_last:  # before the trailing special token
        assert out["input_ids"].tolist() == [[5, 6, 1, 2, 7, 0], [0, 0, 8, 1, 2, 9]]
        assert out["predict_at"].tolist() == [3, 4]
    else:
        assert out["input_ids"].tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 9, 1, 2]]
        assert out["predict_at"].tolist() == [4, 5]
    assert out["attention_mask"].tolist() == (out["input_ids"] > 0).long().tolist()


def test_multi_token_words_score_the_mean_sum_or_first_token():
    logprobs = torch.log_softmax(torch.randn(2, 10), dim=-1)
    words = [[1, 2], [3]]
    expect = {
        "mean": torch.stack([(logprobs[:, 1] + logprobs[:, 2]) / 2, logprobs[:, 3]], 1),
        "sum": torch.stack([logprobs[:, 1] + logprobs[:, 2], logprobs[:, 3]], 1),
        "first": torch.stack([logprobs[:, 1], logprobs[:, 3]], 1),
    }
    for how, want in expect.items():
        assert torch.allclose(VerbalizerHead("classification", words, how)(logprobs), want)


@pytest.mark.parametrize(
    "family,task", [("gpt2", "sst2"), ("llama", "rte"), ("bert", "sst2"), ("bert", "copa")]
)
def test_class_scores_are_the_lms_own_label_word_log_probs(family, task):
    """The verbalizer's score of class c is the log-probability that the LM (loaded on its own, with
    its head) gives word c after the text and the template, at [MASK] or at the next token."""
    model = PromptTunedModel(
        backbone=f"tiny:{family}", task=task, prompt={"num_tokens": 3}, head="verbalizer"
    )
    tok = load_tokenizer("tiny:bert")
    kind = "masked" if family == "bert" else "causal"
    auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    torch.manual_seed(0)
    lm = auto.from_config(tiny_config(family, 30522)).eval()
    template, words = DEFAULTS[task]
    text = "a gripping film"
    cue = (
        template.replace("{mask}", tok.mask_token)
        if kind == "masked"
        else template.split("{mask}")[0].rstrip()
    )
    ids = torch.tensor([tok(f"{text} {cue}")["input_ids"]])  # [CLS] text cue [SEP]
    at = (ids[0] == tok.mask_token_id).nonzero().item() if kind == "masked" else ids.shape[1] - 2
    embeds = torch.cat([model.prompt(1), lm.get_input_embeddings()(ids)], 1)
    with torch.no_grad():
        want = torch.log_softmax(lm(inputs_embeds=embeds).logits[0, 3 + at], -1)
        batch = encode([text])
        if task == "copa":  # two choice rows of one example: the same text twice here
            batch = {
                **encode([text, text]),
                "num_choices": 2,
                "choice_mask": torch.ones(1, 2, dtype=torch.bool),
            }
        got = model(batch)[0]
    word_ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    expected = torch.stack([want[w].mean() for w in word_ids])
    assert torch.allclose(got if task != "copa" else got[:1], expected, atol=1e-5)
    wrong = torch.log_softmax(lm(inputs_embeds=embeds).logits[0, 3 + at - 1], -1)  # control: one position off
    assert not torch.allclose(torch.stack([wrong[w].mean() for w in word_ids]), expected, atol=1e-3)


def test_only_the_prompt_and_one_offset_per_class_train_and_are_saved():
    model = make("llama", task="mnli")
    assert sorted(model.trained_state()) == ["head.bias", "prompt.embeddings"]
    assert model.trained_state()["head.bias"].shape == (3,)
    assert all(n.startswith(("prompt.", "head.")) for n in model.trainable_names())
    assert not any(p.requires_grad for p in model.lm_output.parameters())
    assert list(make("llama", task="copa").trained_state()) == ["prompt.embeddings"]  # choices: no offset


def test_the_tied_output_layer_is_the_backbone_embedding_not_a_copy():
    model = make("gpt2")
    assert model.lm_output.tied and not list(model.lm_output.parameters())  # GPT-2 ties: nothing held
    before = logits(model, encode(TEXTS))
    with torch.no_grad():
        model.backbone.get_input_embeddings().weight[2307] *= (
            2.0  # the word "great": its output row moves too
        )
    assert not torch.allclose(logits(model, encode(TEXTS))[:, 1], before[:, 1])


# ---- settings ---------------------------------------------------------------------------------------
def test_every_classification_and_choice_task_has_default_label_words():
    for name, spec in TASKS.items():
        if spec.formulation == "regression":
            continue
        cfg = VerbalizerConfig.of(None, spec)
        assert len(cfg.resolved["words"]) == (
            1 if spec.formulation == "multiple_choice" else len(spec.labels)
        )
        assert "{mask}" in cfg.resolved["template"], name


@pytest.mark.parametrize(
    "head,verbalizer,task,message",
    [
        ("mlp", None, "sst2", "module.head='mlp' is unknown; allowed: linear, verbalizer"),
        ("verbalizer", None, "stsb", "cannot score the regression task 'stsb'"),
        ("verbalizer", {"template": "It was"}, "sst2", "must contain {mask} exactly once"),
        ("verbalizer", {"words": ["bad"]}, "sst2", "must be 2 words, for negative, positive"),
        ("verbalizer", {"words": {"negative": "bad"}}, "sst2", "missing ['positive']"),
        ("verbalizer", {"words": ["ok", "ok"]}, "sst2", "repeats a word"),
        (
            "verbalizer",
            {"multi_token": "max"},
            "sst2",
            "multi_token='max' is unknown; allowed: mean, sum, first",
        ),
        ("verbalizer", {"word": ["a", "b"]}, "sst2", "unknown key(s) ['word']"),
    ],
)
def test_bad_head_settings_are_refused_naming_the_key(head, verbalizer, task, message):
    with pytest.raises(ValueError) as err:
        check_head(head, verbalizer, get_task(task))
    assert message in str(err.value)


def test_a_hidden_layer_is_refused_for_the_verbalizer():
    with pytest.raises(VerbalizerError, match=re.escape("set module.head_hidden=0")):
        check_head("verbalizer", None, get_task("sst2"), head_hidden=256)
    assert check_head("linear", None, get_task("sst2"), head_hidden=256) is None


def test_words_by_label_name_follow_the_task_label_order():
    cfg = check_head("verbalizer", {"words": {"positive": "good", "negative": "bad"}}, get_task("sst2"))
    assert cfg.resolved["words"] == ["bad", "good"]


def test_train_refuses_a_bad_head_before_loading_anything(tmp_path):
    from skeleton.train import train

    cfg = compose_config(["module.head=mlp", "paths.data_dir=/nonexistent"], run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=re.escape("module.head='mlp' is unknown")):
        train(cfg)  # the data folder does not exist: the head was checked first
    cfg = compose_config(
        ["task=stsb", "module.head=verbalizer", "paths.data_dir=/nonexistent"], run_dir=tmp_path / "r2"
    )
    with pytest.raises(VerbalizerError, match=re.escape("module.head=linear")):
        train(cfg)


def test_config_composes_and_instantiates_a_verbalizer_decoder():
    from hydra.utils import instantiate

    cfg = compose_config(["model=tiny-llama", "module.head=verbalizer", "module.verbalizer.words=[bad,good]"])
    model = instantiate(cfg.module)
    assert model.hparams.head == "verbalizer" and model.hparams.pooling == "last"
    assert model.hparams.verbalizer == {
        "template": "It was {mask}.",
        "words": ["bad", "good"],
        "multi_token": "mean",
    }


def test_a_checkpoint_without_lm_head_weights_is_refused():
    """all-MiniLM-L6-v2 (the demo model) is a sentence encoder saved without its MLM head."""
    with pytest.raises(MissingLMHeadError, match=re.escape("cls.predictions")):
        PromptTunedModel(backbone="demo", task="sst2", head="verbalizer")


def test_a_saved_masked_lm_folder_loads_with_its_head(tmp_path):
    torch.manual_seed(0)
    lm = AutoModelForMaskedLM.from_config(tiny_config("bert", 30522))
    lm.save_pretrained(tmp_path / "mlm")
    load_tokenizer("tiny:bert").save_pretrained(tmp_path / "mlm")
    model = PromptTunedModel(
        backbone=str(tmp_path / "mlm"), task="sst2", prompt={"num_tokens": 2}, head="verbalizer"
    )
    assert torch.equal(
        model.backbone.embeddings.word_embeddings.weight, lm.bert.embeddings.word_embeddings.weight
    )
    assert torch.equal(
        model.lm_output.lm.cls.predictions.transform.dense.weight, lm.cls.predictions.transform.dense.weight
    )


# ---- localization and artifacts ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_pruned_equals_masked_with_the_verbalizer(family, tmp_path):
    """Attribution's target is the label word's log-probability; pruning what it ranks low equals masking
    it; the skeleton artifact reloads to the same scores, bit for bit."""
    model = PromptTunedModel(backbone=lm_folder(tmp_path / family, family), task="sst2", prompt={"num_tokens": 3},
                             head="verbalizer").eval()  # fmt: skip
    batch = encode(TEXTS)
    scores = score_neurons(model, [batch], heads=True)
    assert all(
        torch.isfinite(s).all() and s.abs().sum() > 0 for s in scores.ffn
    )  # gradients reach every layer
    keep_ffn, keep_heads = select_neurons(scores, 0.5), select_heads(scores, 0.25)
    dense_identity, dense = model.backbone_identity(), logits(model, batch)
    with masked(model.backbone, keep_ffn, keep_heads):
        want = logits(model, batch)
    assert not torch.allclose(want, dense, atol=1e-3)
    prune_ffn(model.backbone, keep_ffn)
    prune_heads(model.backbone, keep_heads)
    got = logits(model, batch)
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.5, -0.5]))  # a trained offset must travel with the artifact
        got = model(batch)
    path = save_skeleton(
        model, tmp_path / "sk", keep_ffn=keep_ffn, keep_heads=keep_heads, dense_identity=dense_identity
    )
    meta = json.loads((path / "skeleton.json").read_text())
    assert meta["model"]["head"] == "verbalizer" and meta["model"]["verbalizer"]["words"] == [
        "terrible",
        "great",
    ]
    loaded = load_skeleton(path)
    assert torch.equal(logits(loaded, batch), got)
    with pytest.raises(ArtifactError, match="load_skeleton and skeleton-predict rebuild the LM head"):
        export_pruned(loaded, tmp_path / "export")


def test_a_verbalizer_run_trains_prunes_and_predicts_end_to_end(tmp_path, capsys):
    """skeleton-train on a tiny GPT-2 with the verbalizer, then skeleton-predict on its run folder gives
    the predictions of the reloaded skeleton."""
    from skeleton.cli.predict import main as predict_main
    from skeleton.export import load_model
    from skeleton.train import train

    run = tmp_path / "run"
    summary = train(compose_config(["model=tiny-gpt2", "module.head=verbalizer"], run_dir=run))
    assert summary.status == "complete" and summary.skeleton is not None
    tsv = tmp_path / "in.txt"
    tsv.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "preds.jsonl"
    assert predict_main([str(run), "--input", str(tsv), "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = load_model(run).predict(TEXTS)
    assert [r["prediction"] for r in records] == [r["prediction"] for r in expected]
    flat = lambda recs: [s for r in recs for s in r["scores"]]  # noqa: E731
    assert flat(records) == pytest.approx(flat(expected), abs=1e-6)


def test_template_and_words_tokenize_as_they_read_after_the_text_with_a_byte_level_bpe():
    """GPT-2-style vocabularies mark a word start in the token ("Ġwas"): the template starts a word
    after the input, and the label word one after the template, as they would in running text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from skeleton.verbalizer import tokens_for

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "a gripping film . It was great .",
        "dull . It was terrible .",
        "It was great",
        "terrible film",
    ] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tokens = tokens_for(tok, "It was {mask}.", ["terrible", "great"], "causal")
    running = tok("a gripping film It was great", add_special_tokens=False)["input_ids"]
    text = tok("a gripping film", add_special_tokens=False)["input_ids"]
    assert text + tokens.suffix + tokens.words[1] == running
    assert tokens.predict_offset == len(tokens.suffix) - 1 and not tokens.before_last
    assert tok.convert_ids_to_tokens(tokens.suffix)[0].startswith("Ġ")  # "ĠIt": a new word, not "filmIt"


def test_the_linear_default_keeps_the_hashes_of_runs_made_before_the_head_key():
    """Caches and finished runs made before module.head existed still match; a verbalizer never does."""
    from omegaconf import OmegaConf

    from skeleton.fingerprints import config_fingerprint

    cfg = compose_config([])
    before = OmegaConf.to_container(cfg, resolve=True)
    del before["module"]["head"], before["module"]["verbalizer"]
    assert config_fingerprint(cfg) == config_fingerprint(OmegaConf.create(before))
    assert config_fingerprint(compose_config(["module.head=verbalizer"])) != config_fingerprint(cfg)
    words = compose_config(["module.verbalizer.words=[bad,good]"])
    assert config_fingerprint(words) != config_fingerprint(cfg)
