"""Every config group composes, and the objects it describes instantiate (not only compose)."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from skeleton.configs import CONFIG_DIR, options
from skeleton.localize.config import SkeletonConfig
from skeleton.loggers import build_loggers
from skeleton.prompt import PromptTunedModel
from skeleton.tasks import get_task
from skeleton.train import build_callbacks, skeleton_config
from tests.helpers import compose_config

GROUP = Path(CONFIG_DIR)


@pytest.mark.parametrize("task", options("task"))
def test_every_task_config_names_a_registered_task(task):
    cfg = compose_config([f"task={task}"], tiny=False)
    assert get_task(cfg.task.name).name == get_task(task).name
    assert cfg.data.task == cfg.module.task == cfg.task.name


@pytest.mark.parametrize("task", options("task"))
def test_every_task_config_builds_a_model_for_its_task(task):
    """Each task's head is built for its formulation and label count on a tiny backbone."""
    cfg = compose_config([f"task={task}"])
    model = instantiate(cfg.module)
    spec = get_task(task)
    assert model.task is spec and model.head.formulation == spec.formulation


@pytest.mark.parametrize("model", [m for m in options("model") if m.startswith("tiny-")])
def test_every_tiny_model_config_instantiates(model):
    cfg = compose_config([f"model={model}"])
    module = instantiate(cfg.module)
    assert isinstance(module, PromptTunedModel) and module.backbone_name == cfg.model.backbone


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_composes(model):
    """Real checkpoints are not downloadable here; their configs must still compose and agree."""
    overrides = [f"model={model}"] + (["model.backbone=/some/folder"] if model == "local" else [])
    cfg = compose_config(overrides, tiny=False)
    assert cfg.module.backbone == cfg.data.tokenizer == cfg.model.backbone
    assert cfg.model.pooling in ("auto", "mean", "first", "last", "prompt")


@pytest.mark.parametrize("prompt", options("prompt"))
def test_every_prompt_config_builds_a_model(prompt, tmp_path):
    overrides = [f"prompt={prompt}", "prompt.num_tokens=5"]
    if prompt == "peft":  # needs an adapter folder: a 5-token prompt for the tiny BERT (hidden 32)
        from skeleton.peft_interop import save_peft_prompt

        save_peft_prompt(torch.randn(5, 32), tmp_path)
        overrides += [f"prompt.path={tmp_path}"]
    cfg = compose_config(overrides)
    model = instantiate(cfg.module)
    assert model.prompt.num_tokens == 5


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_sets_what_it_says(experiment):
    cfg = compose_config([f"experiment={experiment}"], tiny=False)
    raw = yaml.safe_load((GROUP / "experiment" / f"{experiment}.yaml").read_text())
    for key in ("trainer", "data", "skeleton"):
        for name, value in (raw.get(key) or {}).items():
            if not isinstance(value, dict):
                assert OmegaConf.select(cfg, f"{key}.{name}") == value, f"{key}.{name}"
    skeleton_config(cfg)  # its skeleton settings validate


@pytest.mark.parametrize("trainer", [t for t in options("trainer") if t in ("cpu", "ddp_cpu")])
def test_cpu_trainer_configs_instantiate_a_trainer(trainer, tmp_path):
    cfg = compose_config([f"trainer={trainer}"])
    built = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False)
    assert isinstance(built, L.Trainer) and built.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_config_targets_lightning(trainer):
    cfg = compose_config([f"trainer={trainer}"], tiny=False)
    assert instantiate({"_target_": "hydra.utils.get_class", "path": cfg.trainer._target_}) is L.Trainer


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_every_callbacks_config_instantiates(callbacks):
    cfg = compose_config([f"callbacks={callbacks}"])
    built = build_callbacks(cfg)
    assert len(built) == sum(node is not None for node in cfg.callbacks.values())
    assert all(isinstance(c, L.Callback) for c in built)


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_config_instantiates(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config([f"logger={logger}"])
    built = build_loggers(cfg, tmp_path)
    assert len(built) == len(cfg.logger or {})


@pytest.mark.parametrize("skeleton", options("skeleton"))
def test_every_skeleton_config_validates(skeleton):
    cfg = compose_config([f"skeleton={skeleton}"])
    settings = skeleton_config(cfg)
    assert (settings is None) == (not cfg.skeleton.enabled)


def test_the_skeleton_yaml_states_the_dataclass_defaults():
    """skeleton/conf/skeleton/default.yaml restates the defaults for readers; it must never drift from them."""
    raw = OmegaConf.to_container(OmegaConf.load(GROUP / "skeleton" / "default.yaml"))
    assert SkeletonConfig.from_dict(raw).to_dict() == SkeletonConfig().to_dict()
    assert raw == SkeletonConfig().to_dict()


def test_quickstart_is_minilm_on_local_sst2():
    cfg = compose_config(["experiment=quickstart"], tiny=False)
    assert (cfg.task.name, cfg.model.backbone, cfg.skeleton.enabled) == ("sst2", "demo", True)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-roberta"])
def test_datamodule_and_module_instantiate(model, tmp_path):
    cfg = compose_config([f"model={model}"], run_dir=tmp_path / "run")
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert module(batch).shape == (batch["labels"].shape[0], 2)


@pytest.mark.parametrize(("override", "listed"), [("model=nope", "tiny-bert"), ("task=nope", "sst2")])
def test_unknown_config_choice_lists_the_known_ones(override, listed):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=listed):
        compose_config([override], tiny=False)


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="sst2"):
        get_task("sst-3")


def test_a_local_backbone_is_named_by_what_it_is(tmp_path):
    """Two different local backbones never share a run name (and so a table row)."""
    import json

    names = []
    for recorded in ("bert-base-uncased", "/home/me/models/roberta-large"):
        folder = tmp_path / recorded.strip("/").replace("/", "_") / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"_name_or_path": recorded}))
        names.append(compose_config(["model=local", f"model.backbone={folder}"], tiny=False).model.name)
    assert names == ["bert-base-uncased", "roberta-large"]
    given = compose_config(["model=local", f"model.backbone={tmp_path}", "model.name=mine"], tiny=False)
    assert given.model.name == "mine"
