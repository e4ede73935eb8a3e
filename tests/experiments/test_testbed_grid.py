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
