"""Config loading, overrides and validation errors."""

from __future__ import annotations

import pytest

from ubsmoe.config import (
    RunConfig,
    config_from_dict,
    flatten,
    load_config,
    parse_overrides,
    unflatten,
)
from ubsmoe.config.model import packaged_base_path
from ubsmoe.errors import ConfigError
from ubsmoe.methods.a3smoe import A3SMoEConfig


@pytest.mark.real_default
def test_embedded_default_is_the_documented_run():
    cfg = load_config()
    assert cfg.model.name == str(packaged_base_path()) and cfg.fl.num_clients == 8
    assert cfg.fl.budgets == [0.125, 0.25, 0.5, 1.0]
    assert cfg.fl.rounds >= 2


def test_overrides_are_typed_and_nested():
    cfg = load_config(overrides=["fl.rounds=5", "train.lr=3e-4", "fl.budgets=[0.5,1.0]",
                                 "method=a3smoe", "a3smoe.gamma=2", "model.attention_lora=false"])
    assert cfg.fl.rounds == 5 and cfg.train.lr == 3e-4 and cfg.fl.budgets == [0.5, 1.0]
    assert cfg.method == "a3smoe" and isinstance(cfg.method_config, A3SMoEConfig)
    assert cfg.method_config.gamma == 2.0 and cfg.model.attention_lora is False


def test_all_errors_reported_together_with_dotted_names():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["fl.rounds=0", "train.lr=-1", "data.partition=random", "fl.fraction=2"])
    msg = str(e.value)
    for field in ("fl.rounds", "train.lr", "data.partition", "fl.fraction"):
        assert field in msg
    assert "one of iid, dirichlet" in msg


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match=r"fl.round: unknown key \(allowed: .*rounds"):
        load_config(overrides=["fl.round=3"])
    with pytest.raises(ConfigError, match="nonsense: unknown key"):
        load_config(overrides=["nonsense=1"])


@pytest.mark.parametrize("budget", ["[0.0,1.0]", "[0.5,1.5]", "[-0.1]"])
def test_budget_outside_unit_interval_rejected(budget):
    with pytest.raises(ConfigError, match=r"fl.budgets: .*\(0, 1\]"):
        load_config(overrides=[f"fl.budgets={budget}"])


def test_wrong_types_rejected():
    with pytest.raises(ConfigError, match="fl.rounds: got 'many', expected an integer"):
        load_config(overrides=["fl.rounds=many"])
    with pytest.raises(ConfigError, match="fl.rounds: got 2.5, expected an integer"):
        load_config(overrides=["fl.rounds=2.5"])
    with pytest.raises(ConfigError, match="model.attention_lora"):
        load_config(overrides=["model.attention_lora=maybe"])


def test_client_resources_and_keep_checkpoints_validated():
    cfg = load_config(overrides=["fl.client_cpus=2", "fl.client_gpus=0.5", "fl.keep_checkpoints=0"])
    assert (cfg.fl.client_cpus, cfg.fl.client_gpus, cfg.fl.keep_checkpoints) == (2, 0.5, 0)
    assert load_config().fl.keep_checkpoints == 2 and load_config().fl.client_gpus == 0.0
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["fl.client_cpus=0.5", "fl.client_gpus=-1", "fl.keep_checkpoints=-1"])
    msg = str(e.value)
    assert "fl.client_cpus: got 0.5, expected a whole number >= 1" in msg
    assert "fl.client_gpus: got -1" in msg and "fl.keep_checkpoints: got -1" in msg


def test_unknown_method_and_bad_method_field():
    with pytest.raises(ConfigError, match="method: got 'nope', expected one of"):
        load_config(overrides=["method=nope"])
    with pytest.raises(ConfigError, match="a3smoe.gamma"):
        load_config(overrides=["method=a3smoe", "a3smoe.gamma=-2"])
    with pytest.raises(ConfigError, match="a3smoe.beta: unknown key"):
        load_config(overrides=["method=a3smoe", "a3smoe.beta=1"])


def test_section_of_unselected_method_warns():
    with pytest.warns(UserWarning, match="'a3smoe' is ignored"):
        cfg = load_config(overrides=["method=smoe", "a3smoe.gamma=2"])
    assert cfg.method == "smoe"


def test_round_trip_through_dict_and_flat_form():
    cfg = load_config(overrides=["method=a3smoe", "a3smoe.gamma=3", "data.tasks=[boolq,piqa]"])
    again = config_from_dict(unflatten(flatten(cfg.to_dict())))
    assert again == cfg


def test_yaml_file_and_missing_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("fl:\n  rounds: 7\nmethod: fedit\n")
    cfg = load_config(path, ["fl.num_clients=4"])
    assert cfg.fl.rounds == 7 and cfg.fl.num_clients == 4 and cfg.method == "fedit"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["fl.rounds"])


def test_method_config_type_checked():
    with pytest.raises(ConfigError, match="expected A3SMoEConfig"):
        RunConfig(method="a3smoe", method_config=object())


@pytest.mark.parametrize("overrides", [
    ["method=ubsmoe", "ubsmoe.lambda_pg=0.3", "ubsmoe.dmr.momentum=0.5", "ubsmoe.pg=false"],
    ["method=a3smoe", "a3smoe.gamma=2.5"],
    ["method=smoe_llb", "smoe_llb.aux_loss_coef=0.05", "fl.rounds=7"],
])
def test_config_survives_the_flower_message_round_trip(overrides):
    """The client rebuilds exactly the server's config (method section included)."""
    from ubsmoe.fl.messages import KEY_ROUND, KEY_TOP_K, config_from_record, config_to_record

    cfg = load_config(overrides=overrides)
    back, instruction = config_from_record(config_to_record(cfg, **{KEY_ROUND: 3, KEY_TOP_K: 2}))
    assert back.to_dict() == cfg.to_dict()
    assert instruction == {KEY_ROUND: 3, KEY_TOP_K: 2}
