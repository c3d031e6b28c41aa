"""The prompt-tuned model: only the prompt and head train, the prompt is really in the input, pooling is right."""

import pytest
import torch

from skeleton.backbones import weights_hash
from skeleton.heads import TaskHead
from skeleton.prompt import PromptConfig, PromptTunedModel


def make_batch(rows=3, length=7, pad_last=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[-1, length - pad_last :] = 0
    ids[-1, length - pad_last :] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.tensor([0, 1, 0][:rows]),
        "num_choices": 1,
    }


@pytest.fixture(scope="module")
def model():
    return PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 4})


def test_only_prompt_and_head_are_trainable(model):
    assert all(n.startswith(("prompt.", "head.")) for n in model.trainable_names())
    counts = model.parameter_counts()
    assert counts["prompt"] == 4 * 32
    assert counts["trainable"] == 4 * 32 + 32 * 2 + 2


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_prompt_gets_gradients_and_backbone_stays_bit_identical(family):
    model = PromptTunedModel(backbone=f"tiny:{family}", task="sst2", prompt={"num_tokens": 4, "lr": 0.1})
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    prompt_before = model.prompt.embeddings.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(3):
        batch = make_batch(seed=step)
        loss = torch.nn.functional.cross_entropy(model(batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        assert model.prompt.embeddings.grad is not None and model.prompt.embeddings.grad.abs().sum() > 0
        optimizer.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(prompt_before, model.prompt.embeddings.detach())


def test_prompt_changes_the_output(model):
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        out = model(batch)
        noise = torch.randn_like(model.prompt.embeddings)  # not a constant: LayerNorm would remove it
        model.prompt.embeddings.add_(noise)
        shifted = model(batch)
        model.prompt.embeddings.sub_(noise)
    assert not torch.allclose(out, shifted)


def test_padding_does_not_change_predictions(model):
    """The attention mask covers prompt + tokens: extra padding must not leak into the result."""
    model.eval()
    batch = make_batch(rows=1, length=5, pad_last=0)
    padded = {k: v for k, v in batch.items()}
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(1, 3, dtype=torch.long)], 1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], 1)
    padded["token_type_ids"] = torch.zeros_like(padded["input_ids"])
    with torch.no_grad():
        assert torch.allclose(model(batch), model(padded), atol=1e-5)


def test_content_mask_excludes_prompt_and_padding(model):
    batch = make_batch()
    mask = model.content_mask(batch)
    assert mask.shape == (3, 4 + 7)
    assert not mask[:, :4].any()
    assert mask[0, 4:].all() and mask[2, -2:].sum() == 0


def test_first_pooling_reads_the_real_first_token():
    model = PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 3}, pooling="first")
    batch = make_batch()
    hidden = model.encode(batch)
    assert torch.equal(model.pool(hidden, batch), hidden[:, 3])


def test_mean_pooling_ignores_prompt_and_padding(model):
    batch = make_batch()
    hidden = torch.randn(3, 4 + 7, 32)
    pooled = model.pool(hidden, batch)
    assert torch.allclose(pooled[2], hidden[2, 4 : 4 + 5].mean(0), atol=1e-6)


def test_backbone_dropout_is_off_by_default_and_configurable():
    quiet = PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 2})
    quiet.train()
    assert not quiet.backbone.training
    noisy = PromptTunedModel(
        backbone="tiny:bert", task="sst2", prompt={"num_tokens": 2}, backbone_dropout=0.3
    )
    noisy.train()
    assert noisy.backbone.training
    assert {m.p for m in noisy.backbone.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}


@pytest.mark.parametrize("init", ["random", "vocab", "text"])
def test_prompt_inits(init):
    cfg = {"num_tokens": 5, "init": init, "init_text": "great movie" if init == "text" else None}
    model = PromptTunedModel(backbone="tiny:bert", task="sst2", prompt=cfg)
    assert model.prompt.embeddings.shape == (5, 32)
    if init == "vocab":
        vocab = model.backbone.get_input_embeddings().weight
        assert all((vocab == row).all(dim=1).any() for row in model.prompt.embeddings.detach())


def test_bad_prompt_and_pooling_are_named():
    with pytest.raises(ValueError, match=r"prompt\.init_text"):
        PromptConfig(init="text")
    with pytest.raises(ValueError, match=r"prompt\.init='nope'"):
        PromptConfig(init="nope")
    with pytest.raises(ValueError, match="pooling='max'"):
        PromptTunedModel(backbone="tiny:bert", task="sst2", pooling="max")


def test_unknown_backbone_folder_is_named():
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        PromptTunedModel(backbone="/no/such/model", task="sst2")


def test_checkpoint_holds_only_trained_weights(model):
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("backbone.") for k in checkpoint["state_dict"])
    assert checkpoint["skeleton_backbone"]["name_or_path"] == "tiny:bert"
    assert checkpoint["skeleton_backbone"]["sha256"] == weights_hash(model.backbone)


def test_multiple_choice_head_masks_missing_choices():
    head = TaskHead("multiple_choice", 8)
    scores = head(torch.randn(6, 8), num_choices=3, choice_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
    assert scores.shape == (2, 3) and torch.isinf(scores[0, 2]) and torch.isfinite(scores[1]).all()


def test_content_mask_can_include_the_prompt(model):
    batch = make_batch()
    mask = model.content_mask(batch, include_prompt=True)
    assert mask[:, :4].all() and torch.equal(mask[:, 4:], batch["attention_mask"].bool())


def test_prompt_positions_change_scores_only_when_included(model):
    """Counting the soft prompt positions must change the scores (they carry activations too)."""
    from skeleton.localize import score_neurons

    batches = [make_batch(seed=s) for s in range(2)]
    default = score_neurons(model, batches)
    content = score_neurons(model, batches, include_prompt=False)
    with_prompt = score_neurons(model, batches, include_prompt=True)
    assert all(torch.equal(a, b) for a, b in zip(default.ffn, with_prompt.ffn))  # the config's default
    assert not all(torch.allclose(a, b) for a, b in zip(content.ffn, with_prompt.ffn))
    assert with_prompt.meta["include_prompt"] is True
