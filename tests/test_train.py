"""Whole runs on tiny random backbones: a real Trainer fit, the Skeleton callback, the run folder."""

import json

import pytest
import torch

from skeleton import runs
from skeleton.summary import COMPLETE, SCHEMA_VERSION, RunSummary
from skeleton.train import train
from tests.helpers import compose_config


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-roberta"])
def test_prompt_tuning_run_leaves_a_complete_run_folder(model, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config([f"model={model}", "skeleton=off"], run_dir=run_dir)
    summary = train(cfg)
    on_disk = json.loads((run_dir / runs.SUMMARY).read_text())
    assert on_disk["status"] == COMPLETE and on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["task"] == "sst2" and on_disk["headline_metric"] == "accuracy"
    assert 0.0 <= on_disk["dense"]["dev"]["accuracy"] <= 1.0
    assert on_disk["train"]["steps"] == 4
    assert RunSummary.from_dict(on_disk) == summary  # round trip through the schema
    assert (run_dir / "config.yaml").exists()
    assert list(run_dir.glob("csv/**/metrics.csv")), "per-epoch metrics missing"
    assert "pruned" not in on_disk and summary.skeleton is None


def test_skeleton_run_prunes_and_reports(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(["skeleton.psi=100"], run_dir=run_dir)  # any drop allowed: the search goes far
    out = train(cfg).skeleton
    assert out.rate >= 0.5
    kept, total = out.ffn.kept_per_layer, out.ffn.total_per_layer
    assert sum(kept) < sum(total) == 2 * 64
    assert out.backbone_params.pruned["total"] < out.backbone_params.dense["total"]
    assert out.flops.pruned < out.flops.dense
    latency = out.latency
    assert latency.speedup == pytest.approx(latency.dense_ms / latency.pruned_ms)
    # joint units; the fixture's 3-example search split is too small to hold back a confirmation part
    assert out.units == "joint" and len(out.heads["kept"]) == 2
    chosen = [p for p in out.search_points if p.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["rate"] == out.rate and "confirmed" not in chosen[0]
    assert [p["rate"] for p in out.search_points] == [r for r, _ in out.curve[1:]]
    assert all(p["modelled_speedup"] >= 1.0 for p in out.search_points)
    assert out.modelled_speedup > 1.0 and set(out.drops) == {"search", "dev"}
    assert (run_dir / "skeleton" / "skeleton.json").exists() and out.artifact == str(run_dir / "skeleton")


def test_a_reconstructed_run_ships_the_network_its_search_judged(tmp_path, monkeypatch):
    """reconstruct.enabled: every judged candidate is fitted, and the artifact carries the fit, so a reload
    is the compensated network, not the plain pruned one."""
    import skeleton.pipeline as pipeline
    from skeleton.bench import synthetic_batch
    from skeleton.export import build_dense, load_skeleton, read_meta, read_tensors
    from skeleton.localize import prune_ffn, prune_heads

    fits = []
    real = pipeline.fit_compensation
    monkeypatch.setattr(pipeline, "fit_compensation", lambda *a, **k: fits.append(1) or real(*a, **k))
    run_dir = tmp_path / "run"
    cfg = compose_config(["skeleton.psi=100", "skeleton.reconstruct.enabled=true"], run_dir=run_dir)
    out = train(cfg).skeleton
    assert out.rate >= 0.5 and out.seconds["reconstruct"] >= 0
    assert len(fits) == len(out.search_points) + 1  # each judged candidate, then the shipped network
    artifact = run_dir / "skeleton"
    meta, tensors = read_meta(artifact), read_tensors(artifact / "skeleton.safetensors")
    assert meta["format_version"] == 2 and any(k.startswith("comp.") for k in tensors)

    shipped = load_skeleton(artifact)
    plain = build_dense(artifact)  # the same kept units without the fit
    prune_ffn(plain.backbone, [tensors[f"keep.ffn.{i}"] for i in range(meta["num_layers"])])
    prune_heads(plain.backbone, [tensors[f"keep.heads.{i}"] for i in range(meta["num_layers"])])
    batch = synthetic_batch(shipped, 4, 12)
    with torch.no_grad():
        assert not torch.allclose(shipped(batch), plain.eval()(batch), atol=1e-5)


@pytest.mark.parametrize("joint_reaches", [0.2, None])
def test_units_best_keeps_the_faster_of_the_joint_and_the_ffn_only_network(
    tmp_path, monkeypatch, joint_reaches
):
    """units=best: where the joint ranking stops early, FFN neurons alone go further and win (every head
    kept); where it already passed the FFN neurons' share of the cost, no second search runs."""
    import skeleton.pipeline as pipeline
    from skeleton.export import load_skeleton
    from skeleton.localize import ffn_widths, heads_per_layer

    search_rate = pipeline.search_rate

    def joint_stops_early(*args, max_rate=None, ranking=None, **kw):
        if ranking is None and joint_reaches is not None:
            max_rate = joint_reaches
        return search_rate(*args, max_rate=max_rate, ranking=ranking, **kw)

    monkeypatch.setattr(pipeline, "search_rate", joint_stops_early)
    search_splits, made = pipeline.search_splits, []
    monkeypatch.setattr(pipeline, "search_splits", lambda *a: made.append(1) or search_splits(*a))
    run_dir = tmp_path / "run"
    overrides = ["skeleton.psi=100", "skeleton.pruning.units=best", "skeleton.search.granularity=0.05"]
    cfg = compose_config(overrides, run_dir=run_dir)
    out = train(cfg).skeleton
    assert out.skeleton_config["pruning"]["units"] == "best"
    rankings = {p.get("ranking") for p in out.search_points}
    chosen = [p for p in out.search_points if p.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["rate"] == out.rate
    if joint_reaches is None:  # the joint ranking went past every neuron's share: nothing left to try
        assert out.units == "joint" and rankings == {None} and out.rate > 0.9
        return
    assert out.units == "ffn" and rankings == {None, "ffn"} and chosen[0]["ranking"] == "ffn"
    assert len(made) == 1  # both searches share one split of the search split (no dense pass again)
    assert out.rate > joint_reaches and out.heads["kept"] == out.heads["dense"]
    joint_best = max(p["modelled_speedup"] for p in out.search_points if "ranking" not in p)
    assert out.modelled_speedup > joint_best
    reloaded = load_skeleton(run_dir / "skeleton")  # the artifact rebuilds the FFN-only network
    assert ffn_widths(reloaded.backbone) == out.ffn.kept_per_layer
    assert heads_per_layer(reloaded.backbone) == out.heads["dense"]


def test_a_point_search_curve_starts_at_the_dense_search_score(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(["skeleton.psi=100", "skeleton.search.acceptance=point"], run_dir=run_dir)
    out = train(cfg).skeleton
    assert out.curve[0] == [0.0, runs.read_summary(run_dir).dense.search["accuracy"]]
    assert all(p["accepted"] for p in out.search_points) and "confirmed" not in out.search_points[-1]


def test_completed_run_is_skipped(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = compose_config(["skeleton=off"], run_dir=run_dir)
    first = train(cfg)
    monkeypatch.setattr("skeleton.train.instantiate", lambda *a, **k: pytest.fail("reran a finished run"))
    assert train(cfg) == runs.read_summary(run_dir)
    assert first.dense == runs.read_summary(run_dir).dense


def test_second_margin_reuses_prompt_and_scores(tmp_path, monkeypatch):
    first = train(compose_config(["skeleton.psi=100"], run_dir=tmp_path / "psi100"))
    assert "reused_prompt" not in first.train

    import lightning

    import skeleton.pipeline

    monkeypatch.setattr(lightning.Trainer, "fit", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(skeleton.pipeline, "score_neurons", lambda *a, **k: pytest.fail("scored again"))
    second = train(compose_config(["skeleton.psi=0"], run_dir=tmp_path / "psi0"))
    assert second.train["reused_prompt"]
    assert second.train["steps"] == first.train["steps"]
    assert second.dense == first.dense
    assert second.skeleton.psi == 0 and second.skeleton.rate <= first.skeleton.rate


def test_a_wider_margin_extends_the_cached_ranking_to_what_a_fresh_run_finds(tmp_path, monkeypatch):
    """A search capped at 25% runs only the re-scoring rounds its rates need; psi=100 then resumes the
    cached partial ranking, runs the rest, and prunes exactly what a run that scored everything prunes."""
    import skeleton.pipeline

    passes = []
    score_neurons = skeleton.pipeline.score_neurons
    monkeypatch.setattr(
        skeleton.pipeline, "score_neurons", lambda *a, **k: passes.append(1) or score_neurons(*a, **k)
    )
    narrow = train(compose_config(["skeleton.search.max_rate=0.25"], run_dir=tmp_path / "narrow"))
    partial = len(passes)
    wide = train(compose_config(["skeleton.psi=100"], run_dir=tmp_path / "psi100"))
    extended = len(passes) - partial
    fresh = train(compose_config(["skeleton.psi=100", "reuse=false"], run_dir=tmp_path / "fresh"))
    full = len(passes) - partial - extended
    assert narrow.skeleton.rate <= 0.25 and 1 < partial < full
    assert extended == full - partial  # wide ran only the rounds narrow had not
    assert wide.train["reused_prompt"] and wide.skeleton.rate == fresh.skeleton.rate
    assert wide.skeleton.ffn == fresh.skeleton.ffn and wide.skeleton.heads == fresh.skeleton.heads
    assert wide.skeleton.pruned == fresh.skeleton.pruned


def test_changing_the_prompt_config_does_not_reuse(tmp_path):
    train(compose_config(["skeleton.psi=100"], run_dir=tmp_path / "a"))
    other = train(compose_config(["skeleton.psi=100", "seed=1"], run_dir=tmp_path / "b"))
    assert "reused_prompt" not in other.train


@pytest.mark.parametrize("task", ["stsb", "copa", "record", "multirc", "wic", "cb", "cola", "mnli"])
def test_every_formulation_trains_and_prunes(task, tmp_path):
    """Regression, two-choice, candidate ranking, grouped answers, spans, 3 classes, MCC, MNLI."""
    summary = train(
        compose_config([f"task={task}", "skeleton.psi=100", "data.search_size=2"], run_dir=tmp_path / "run")
    )
    assert summary.score("dense") is not None and summary.score("pruned") is not None
    assert sum(summary.skeleton.ffn.kept_per_layer) < sum(summary.skeleton.ffn.total_per_layer)


def test_wandb_offline_run_logs_curve_image_and_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    summary = train(compose_config(["logger=wandb", "skeleton.psi=100"], run_dir=run_dir))
    (offline,) = run_dir.glob("wandb/offline-run-*")
    media = offline / "files" / "media"
    assert list(media.glob("table/skeleton/curve_table_*.table.json"))  # the pruning curve
    assert list(media.glob("images/skeleton/kept_per_layer_*.png"))  # neurons kept per layer
    assert summary.skeleton.rate > 0 and list(run_dir.glob("csv/**/metrics.csv"))  # both loggers ran


def test_a_model_that_learned_nothing_is_flagged(tmp_path, monkeypatch):
    """Constant predictions keep any score under any pruning: the summary must say so."""
    from skeleton.heads import TaskHead
    from skeleton.pipeline import DEGENERATE

    real = TaskHead.forward
    monkeypatch.setattr(
        TaskHead, "forward", lambda self, *a, **k: real(self, *a, **k) * 0 + torch.tensor([1.0, 0.0])
    )
    summary = train(compose_config(["skeleton.psi=1"], run_dir=tmp_path / "run"))
    assert DEGENERATE in summary.skeleton.warnings and summary.skeleton.degenerate is True


def test_degenerate_predictions_are_recognised():
    from skeleton.evaluate import is_degenerate

    same = [torch.tensor([[2.0, 1.0], [3.0, 0.0]]), torch.tensor([[1.0, -1.0]])]
    mixed = [torch.tensor([[2.0, 1.0], [0.0, 3.0]])]
    assert is_degenerate(same, "classification") and not is_degenerate(mixed, "classification")
    assert is_degenerate([torch.full((4,), 2.5)], "regression")
    assert not is_degenerate([torch.tensor([1.0, 2.0])], "regression")
    assert not is_degenerate([], "classification")


def test_training_time_excludes_the_skeleton_step(tmp_path, monkeypatch):
    import time as clock

    from skeleton.callback import SkeletonCallback

    real = SkeletonCallback.run

    def slow_run(self, *args, **kwargs):
        clock.sleep(1.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SkeletonCallback, "run", slow_run)
    summary = train(compose_config(["skeleton.psi=1"], run_dir=tmp_path / "run"))
    assert summary.wall_seconds - summary.train["seconds"] >= 1.5


def test_head_pruning_without_head_scores_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr("skeleton.train.instantiate", lambda *a, **k: pytest.fail("built something first"))
    with pytest.raises(ValueError, match=r"skeleton\.attribution\.heads=true"):
        train(
            compose_config(
                [
                    "skeleton.pruning.units=ffn",
                    "skeleton.attribution.heads=false",
                    "skeleton.pruning.head_rate=0.25",
                ],
                run_dir=tmp_path / "run",
            )
        )


def test_head_pruning_with_head_scores_removes_heads(tmp_path):
    summary = train(
        compose_config(
            [
                "skeleton.pruning.units=ffn",
                "skeleton.pruning.head_rate=0.25",
                "skeleton.attribution.heads=true",
            ],
            run_dir=tmp_path / "run",
        )
    )
    params = summary.skeleton.backbone_params
    assert params.pruned["attention"] < params.dense["attention"]


def test_head_rate_beyond_the_margin_is_flagged(tmp_path, monkeypatch):
    """The search masks the chosen heads at every rate; a head_rate that alone breaks psi is flagged."""
    from contextlib import contextmanager

    import skeleton.pipeline
    from skeleton.uncertainty import Predictions

    seen, inside = {}, []
    real_candidate, real_collect = skeleton.pipeline.candidate, skeleton.pipeline.collect

    @contextmanager
    def recording(model, ffn_keep=None, head_keep=None, fit=None):
        seen["head_keep"] = head_keep
        with real_candidate(model, ffn_keep, head_keep, fit) as pruned:
            inside.append(True)
            yield pruned
            inside.pop()

    def wrong_when_masked(model, loader):
        preds = real_collect(model, loader)
        if inside:  # every candidate answers every example wrongly: heads alone are beyond any margin
            wrong = (preds.fields["labels"] + 1) % preds.logits.shape[-1]
            preds = Predictions(
                torch.nn.functional.one_hot(wrong, preds.logits.shape[-1]).float(), preds.fields
            )
        return preds

    monkeypatch.setattr(skeleton.pipeline, "candidate", recording)
    monkeypatch.setattr(skeleton.pipeline, "collect", wrong_when_masked)
    summary = train(
        compose_config(
            [
                "skeleton.pruning.units=ffn",
                "skeleton.pruning.head_rate=0.5",
                "skeleton.attribution.heads=true",
                "skeleton.psi=1",
                "skeleton.search.acceptance=point",
            ],
            run_dir=tmp_path / "run",
        )
    )
    assert seen["head_keep"] is not None and all(len(k) < 4 for k in seen["head_keep"])
    assert any("lower skeleton.pruning.head_rate" in w for w in summary.skeleton.warnings)
    assert summary.skeleton.rate == 0.0


def test_recovery_tunes_prompt_and_head_on_the_frozen_pruned_backbone(tmp_path, monkeypatch):
    import skeleton.pipeline

    real, seen = skeleton.pipeline.recover_step, {}

    def recording(model, *args):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = real(model, *args)
        seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return out

    monkeypatch.setattr(skeleton.pipeline, "recover_step", recording)
    summary = train(
        compose_config(
            ["skeleton.psi=100", "skeleton.recovery.steps=5", "skeleton.recovery.lr=0.1"],
            run_dir=tmp_path / "run",
        )
    )
    before, after = seen["before"], seen["after"]
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(not n.startswith("backbone.") for n in moved)
    assert any("prompt" in n for n in moved) and any("head" in n for n in moved)
    assert summary.skeleton.recovered is not None and summary.skeleton.seconds["recovery"] > 0
    from safetensors.torch import load_file

    tensors = load_file(str(next((tmp_path / "run" / "skeleton").glob("*.safetensors"))))
    prompt_name = next(n for n in moved if "prompt" in n)
    assert torch.equal(tensors[prompt_name], after[prompt_name])  # the artifact holds the recovered prompt


def test_recovery_in_a_trainer_takes_the_steps_of_the_hand_written_loop(tmp_path):
    """Recovery runs in Trainer.fit now; it must train exactly as the former AdamW loop did, so the
    README's recovery figures still hold: same batches, same optimizer, same parameters after."""
    import copy
    import itertools

    from hydra.utils import instantiate

    from skeleton.heads import task_loss
    from skeleton.localize.config import RecoveryConfig
    from skeleton.recovery import trainer_recovery

    cfg = compose_config(["data.batch_size=1"], run_dir=tmp_path / "run")
    data, model = instantiate(cfg.data), instantiate(cfg.module)
    data.setup("fit")
    assert len(data.train_dataloader()) > 3  # within one epoch, as recovery is on real data
    reference = copy.deepcopy(model)
    settings = RecoveryConfig(steps=3, lr=0.05)
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=settings.lr)
    reference.train()
    for batch in itertools.islice(itertools.cycle(data.train_dataloader()), settings.steps):
        loss = task_loss(reference.task.formulation, reference(batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trainer_recovery(data, settings)(model)
    ours, theirs = model.trained_state(), reference.trained_state()
    assert not torch.equal(
        ours["prompt.embeddings"], instantiate(cfg.module).trained_state()["prompt.embeddings"]
    )
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_progress_lines_are_printed_once(capsys):
    """Printed where logging does not reach the console; only logged where it does (Hydra's job log)."""
    import logging

    from skeleton.progress import reporter

    reporter(None)("hello")
    assert capsys.readouterr().out.count("hello") == 1
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        reporter(None)("again")
        assert "again" not in capsys.readouterr().out  # the handler (stderr here) shows it instead
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_a_cache_entry_that_does_not_fit_is_refused_with_the_fix(tmp_path):
    from hydra.utils import instantiate

    from skeleton.prompt import TrainedStateError
    from skeleton.reuse import PromptCache

    cfg = compose_config(["skeleton.psi=100"], run_dir=tmp_path / "run")
    cache = PromptCache(cfg, tmp_path / "cache", data="d", backbone_sha256="b")
    longer = {**cfg.module.prompt, "num_tokens": cfg.module.prompt.num_tokens + 1}
    cache.save_prompt(instantiate(cfg.module, prompt=longer), {"steps": 1})
    with pytest.raises(TrainedStateError, match=rf"{cache.folder}.*shapes differ.*delete it"):
        cache.load_prompt(instantiate(cfg.module))  # the configured prompt has another length


def test_impossible_iterative_schedule_is_refused_before_training(tmp_path, monkeypatch):
    import lightning

    monkeypatch.setattr(lightning.Trainer, "fit", lambda *a, **k: pytest.fail("trained first"))
    overrides = ["skeleton.attribution.iterative_step=0.5", "skeleton.attribution.iterative_until=0.2"]
    with pytest.raises(
        ValueError, match=r"skeleton\.attribution\.iterative_until=0\.2 .*below iterative_step"
    ):
        train(compose_config(overrides, run_dir=tmp_path / "run"))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("skeleton.attribution.criterion=foo", r"criterion='foo' is unknown; choose one of: attribution, "),
        ("skeleton.pruning.scope=foo", r"scope='foo' is unknown; choose one of: global, layer"),
        ("skeleton.search.granularity=0", r"skeleton\.search\.granularity=0(\.0)? is invalid"),
        ("skeleton.psi=-1", r"skeleton\.psi=-1(\.0)? is invalid"),
        ("skeleton.attribution.target=foo", r"target='foo' is unknown"),
        ("skeleton.attribution.token_agg=foo", r"token_agg='foo' is unknown"),
        ("skeleton.search.max_rate=2", r"max_rate=2(\.0)? is invalid"),
        ("+skeleton.search.granulrity=0.1", r"skeleton\.search\.granulrity is not a setting"),
    ],
)
def test_a_bad_skeleton_setting_fails_before_anything_is_built(override, named, tmp_path, monkeypatch):
    from skeleton.localize.config import ConfigError

    monkeypatch.setattr("skeleton.train.instantiate", lambda *a, **k: pytest.fail("built something first"))
    with pytest.raises(ConfigError, match=named):
        train(compose_config([override], run_dir=tmp_path / "run"))
