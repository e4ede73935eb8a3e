"""The Flower app configs, as `flwr run` reads them (offline, no SuperLink): the repository's
pyproject.toml (`flwr run .`) and the app shipped with the package (`ubsmoe run`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from flwr.cli.config_utils import load_and_validate
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from flwr.serverapp import ServerApp
from flwr.supercore.object_ref import load_app

from ubsmoe.fl.server_app import config_from_run_config
from ubsmoe.fl.simulation import app_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("directory", [REPO, app_dir()], ids=["repo", "packaged"])
def test_pyproject_flower_app_config_is_valid_and_components_load(monkeypatch, directory):
    # Flower's own validation, as `flwr run` does it (module and attribute checked).
    config, _warnings = load_and_validate(directory / "pyproject.toml", check_module=True)
    components = config["tool"]["flwr"]["app"]["components"]
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_app prepends the app directory
    assert isinstance(load_app(components["serverapp"], ValueError, directory), ServerApp)
    assert isinstance(load_app(components["clientapp"], ValueError, directory), ClientApp)


def test_packaged_app_is_the_repository_app():
    repo, _ = load_and_validate(REPO / "pyproject.toml", check_module=False)
    packaged, _ = load_and_validate(app_dir() / "pyproject.toml", check_module=False)
    assert packaged["tool"]["flwr"]["app"] == repo["tool"]["flwr"]["app"]
    assert app_dir().is_relative_to(Path(__import__("ubsmoe").__file__).parent)  # package data


def test_default_run_config_is_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_config = get_fused_config_from_dir(REPO, {})
    assert set(run_config) == {"config-file", "overrides", "out", "resume", "progress-file", "command"}
    assert run_config["resume"] is False and run_config["progress-file"] == ""
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
