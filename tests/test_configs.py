"""Every config group composes, and the objects it describes instantiate."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from skeleton.tasks import get_task
from skeleton.train import CONFIG_DIR
from tests.helpers import compose_config

GROUP = Path(CONFIG_DIR)
TASKS = sorted(p.stem for p in (GROUP / "task").glob("*.yaml"))
MODELS = sorted(p.stem for p in (GROUP / "model").glob("*.yaml"))
PROMPTS = sorted(p.stem for p in (GROUP / "prompt").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (GROUP / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (GROUP / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("task", TASKS)
def test_every_task_config_names_a_registered_task(task):
    cfg = compose_config([f"task={task}"], tiny=False)
    assert get_task(cfg.task.name).name == get_task(task).name
    assert cfg.data.task == cfg.module.task == cfg.task.name


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes(model):
    overrides = [f"model={model}"] + (["model.backbone=/some/folder"] if model == "local" else [])
    cfg = compose_config(overrides, tiny=False)
    assert cfg.module.backbone == cfg.data.tokenizer == cfg.model.backbone
    assert cfg.model.pooling in ("mean", "first", "last", "prompt")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_prompt_config_builds_a_model(prompt, tmp_path):
    overrides = [f"prompt={prompt}"]
    if prompt == "peft":  # needs an adapter folder: a 5-token prompt for the tiny BERT (hidden 32)
        from skeleton.peft_interop import save_peft_prompt

        save_peft_prompt(torch.randn(5, 32), tmp_path)
        overrides += [f"prompt.path={tmp_path}", "prompt.num_tokens=5"]
    cfg = compose_config(overrides)
    model = instantiate(cfg.module)
    assert model.prompt.num_tokens == cfg.prompt.num_tokens


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"], tiny=False)
    assert cfg.task.name and cfg.trainer.max_steps


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_config_composes(trainer):
    cfg = compose_config([f"trainer={trainer}"], tiny=False)
    assert cfg.trainer._target_ == "lightning.Trainer"


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
