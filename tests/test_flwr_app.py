"""The pyproject's Flower app config, as `flwr run .` reads it (offline, no SuperLink)."""

from __future__ import annotations

import sys
from pathlib import Path

from flwr.cli.config_utils import load_and_validate
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from flwr.serverapp import ServerApp
from flwr.supercore.object_ref import load_app

from ubsmoe.fl.server_app import config_from_run_config

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_flower_app_config_is_valid_and_components_load(monkeypatch):
    # Flower's own validation, as `flwr run .` does it (module and attribute checked).
    config, _warnings = load_and_validate(REPO / "pyproject.toml", check_module=True)
    components = config["tool"]["flwr"]["app"]["components"]
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_app prepends the app directory
    assert isinstance(load_app(components["serverapp"], ValueError, REPO), ServerApp)
    assert isinstance(load_app(components["clientapp"], ValueError, REPO), ClientApp)


def test_default_run_config_is_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_config = get_fused_config_from_dir(REPO, {})
    assert set(run_config) == {"config-file", "overrides", "out"}
    cfg, run_dir = config_from_run_config(run_config)
    assert cfg.fl.num_clients == 8 and cfg.model.name == "tiny"
    assert run_dir.is_absolute() and run_dir.parent == tmp_path / "runs"


def test_run_config_overrides_as_the_readme_passes_them(tmp_path):
    out = tmp_path / "demo"
    overrides = parse_config_args(
        [f'overrides="fl.rounds=1 data.train_examples=200 method=fedit" out="{out}"']
    )
    cfg, run_dir = config_from_run_config(get_fused_config_from_dir(REPO, overrides))
    assert (cfg.fl.rounds, cfg.data.train_examples, cfg.method) == (1, 200, "fedit")
    assert run_dir == out
