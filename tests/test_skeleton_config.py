"""The Skeleton step's settings: one set of defaults, every bad value named before anything runs."""

import inspect
import json

import pytest

from skeleton.localize import score_neurons
from skeleton.localize.config import AttributionConfig, ConfigError, Scope, SkeletonConfig


def test_score_neurons_defaults_are_the_config_defaults():
    params = inspect.signature(score_neurons).parameters
    config = AttributionConfig()
    for name in ("criterion", "target", "token_agg", "magnitude", "unsupervised", "include_prompt", "heads"):
        assert params[name].default == getattr(config, name), name


def test_psi_becomes_a_fraction_in_one_place():
    assert SkeletonConfig(psi=1.5).margin == pytest.approx(0.015)


def test_choices_are_enums_that_read_as_their_strings():
    cfg = SkeletonConfig.from_dict({"pruning": {"units": "ffn", "scope": "layer"}})
    assert (
        cfg.pruning.scope is Scope.LAYER
        and cfg.pruning.scope == "layer"
        and f"{cfg.pruning.scope}" == "layer"
    )
    assert json.loads(json.dumps(cfg.to_dict()))["pruning"]["scope"] == "layer"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (
            {"attribution": {"magnitude": "foo"}},
            r"magnitude='foo' is unknown; choose one of: token, instance",
        ),
        ({"pruning": {"head_rate": 1.0}}, r"head_rate=1.0 is invalid"),
        (
            {"attribution": {"heads": False}, "pruning": {"units": "ffn", "head_rate": 0.5}},
            r"head_rate=0.5 needs head scores",
        ),
        ({"pruning": {"head_rate": 0.5}}, r"units=joint ranks heads with the neurons"),
        ({"pruning": {"scope": "layer"}}, r"use scope=global or units=ffn"),
        ({"attribution": {"heads": False}}, r"units=joint ranks heads with neurons and needs head scores"),
        (
            {"attribution": {"heads": False}, "pruning": {"units": "best"}},
            r"units=best ranks heads with neurons and needs head scores",
        ),
        ({"pruning": {"units": "best", "head_rate": 0.5}}, r"units=best ranks heads with the neurons"),
        ({"search": {"acceptance": "lucky"}}, r"acceptance='lucky' is unknown; choose one of: confirm"),
        ({"search": {"confirm_fraction": 1.0}}, r"confirm_fraction=1.0 is invalid"),
        ({"search": {"acceptance": "paired_se", "resamples": 0}}, r"paired_se needs standard errors"),
        (
            {"cost": {"model": "guess"}},
            r"cost\.model='guess' is unknown; choose one of: auto, measured, flops",
        ),
        ({"cost": {"seq_len": 0}}, r"cost\.seq_len=0 is invalid"),
        ({"attribution": {"iterative_stop": 1.5}}, r"iterative_stop=1.5 is invalid"),
        ({"pruning": {"round_to": 0}}, r"round_to=0 is invalid"),
        ({"attribution": {"max_instances": 0}}, r"max_instances=0 is invalid"),
        ({"recovery": {"steps": -1}}, r"recovery\.steps=-1 is invalid"),
        ({"benchmark": {"repeats": 0}}, r"benchmark\.repeats=0 is invalid"),
        ({"search": {"lookahead": -1}}, r"lookahead=-1 is invalid"),
        ({"serach": {}}, r"skeleton\.serach is not a setting; the settings of skeleton are: enabled, psi"),
        ({"recovery": {"lr": "fast"}}, r"lr='fast' is invalid: use a number"),
    ],
)
def test_a_bad_value_is_named_with_what_is_allowed(values, named):
    with pytest.raises(ConfigError, match=named):
        SkeletonConfig.from_dict(values)


def test_a_round_trip_through_plain_values_is_exact():
    cfg = SkeletonConfig.from_dict(
        {"psi": 2, "attribution": {"heads": True}, "pruning": {"units": "ffn", "head_rate": 0.25}}
    )
    assert SkeletonConfig.from_dict(cfg.to_dict()) == cfg
