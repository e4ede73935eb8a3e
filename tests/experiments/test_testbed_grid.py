"""The testbed experiments (every method, 3 seeds, the four levels) and `ubsmoe sweep --cells` splitting."""

from __future__ import annotations

import pytest

from ubsmoe.errors import ConfigError
from ubsmoe.experiments import load_experiment
from ubsmoe.experiments.sweep import parse_part, plan_sweep, select_part


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_cells_parts_partition_the_grid_exactly(tmp_path, parts):
    exp = load_experiment("table1")
    items = plan_sweep(exp, tmp_path, "tiny", seeds=2)
    chunks = [select_part(items, i, parts) for i in range(1, parts + 1)]
    dirs = [i.run_dir for c in chunks for i in c]
    assert sorted(dirs) == sorted(i.run_dir for i in items) and len(set(dirs)) == len(items)
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    for chunk in chunks:  # each part keeps grid order
        order = [items.index(i) for i in chunk]
        assert order == sorted(order)


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1", "a/b", "1/0", ""])
def test_cells_spec_is_checked(spec):
    with pytest.raises(ConfigError, match="--cells"):
        parse_part(spec)
    assert parse_part("2/5") == (2, 5)


def test_the_testbed_grid_is_every_method_three_seeds_at_the_four_levels():
    from ubsmoe.experiments import resolve_cell
    from ubsmoe.methods import available_methods

    exp = load_experiment("testbed")
    cells = exp.cells("tiny")
    assert sorted({c.method for c in cells}) == sorted(available_methods())
    assert len(cells) == 3 * len(available_methods()) and {c.seed for c in cells} == {0, 1, 2}
    cfg = resolve_cell(exp, cells[0])
    assert cfg.fl.budgets == [0.125, 0.25, 0.5, 1.0] and cfg.fl.budget_pattern == "uniform"
    assert len(load_experiment("testbed_ablation").cells("tiny")) == 6 * 3


def test_reuse_copies_a_finished_run_of_the_same_config_instead_of_running_it(tmp_path):
    """The ablation's `full` row is the testbed grid's ubsmoe cell (same config hash): with
    --reuse it is copied from there (cell.json rewritten), never run; other cells run."""
    import json

    from ubsmoe.experiments.sweep import run_sweep

    testbed = plan_sweep(load_experiment("testbed"), tmp_path / "testbed", "tiny", methods=["ubsmoe"], seeds=1)
    source = testbed[0].run_dir
    source.mkdir(parents=True)
    (source / "summary.json").write_text('{"method": "ubsmoe"}', encoding="utf-8")
    (source / "cell.json").write_text('{"label": "ubsmoe-seed0"}', encoding="utf-8")
    unfinished = tmp_path / "testbed" / "ubsmoe-ablation=none-seed0-nothere"
    unfinished.mkdir()
    items = plan_sweep(load_experiment("testbed_ablation"), tmp_path / "ablation", "tiny", seeds=1,
                       reuse=[tmp_path / "testbed"])
    twins = [i for i in items if i.reuse_from is not None]
    assert [i.cell.label for i in twins] == ["ubsmoe-ablation=full-seed0"] and twins[0].reuse_from == source
    ran = []

    def runner(item):
        ran.append(item.cell.label)
        (item.run_dir / "summary.json").write_text("{}", encoding="utf-8")
        return 0, ""

    run_sweep(items, runner=runner)
    assert "ubsmoe-ablation=full-seed0" not in ran and len(ran) == len(items) - 1
    copy = twins[0].run_dir
    assert twins[0].state == "done" and twins[0].message == f"reused {source}"
    assert json.loads((copy / "summary.json").read_text()) == {"method": "ubsmoe"}
    cell = json.loads((copy / "cell.json").read_text())
    assert cell["label"] == "ubsmoe-ablation=full-seed0" and cell["reused_from"] == str(source)
    assert cell["config_hash"] == source.name.rsplit("-", 1)[1] and not list(tmp_path.glob("*/*.reuse-tmp"))
    # A finished copy is skipped next time; without --reuse nothing is reused.
    again = plan_sweep(load_experiment("testbed_ablation"), tmp_path / "ablation", "tiny", seeds=1)
    assert {i.state for i in again} == {"skipped"}
    fresh = plan_sweep(load_experiment("testbed_ablation"), tmp_path / "other", "tiny", seeds=1)
    assert all(i.reuse_from is None for i in fresh)


def test_cli_reuse_of_a_missing_folder_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from ubsmoe.cli import app

    result = CliRunner().invoke(app, ["sweep", "-c", "testbed", "-o", str(tmp_path / "s"), "--dry-run",
                                      "--reuse", str(tmp_path / "nope")])
    assert result.exit_code == 2 and f"--reuse: '{tmp_path / 'nope'}' is not a folder" in result.output
