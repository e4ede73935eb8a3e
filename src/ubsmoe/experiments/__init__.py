"""The papers' experiments: shipped YAML grids (:mod:`~ubsmoe.experiments.grid`), their cells
(:mod:`~ubsmoe.experiments.cells`) and sweeps (:mod:`~ubsmoe.experiments.sweep`). This package only re-exports."""

from ubsmoe.experiments.cells import (
    cell_dir_name,
    cell_record,
    cell_tree,
    config_hash,
    find_cell,
    resolve_cell,
)
from ubsmoe.experiments.grid import (
    SCALES,
    Cell,
    Experiment,
    RequirementError,
    Setting,
    available_experiments,
    is_experiment_file,
    load_experiment,
    parse_experiment,
)

__all__ = [
    "SCALES",
    "Cell",
    "Experiment",
    "RequirementError",
    "Setting",
    "available_experiments",
    "cell_dir_name",
    "cell_record",
    "cell_tree",
    "config_hash",
    "find_cell",
    "is_experiment_file",
    "load_experiment",
    "parse_experiment",
    "resolve_cell",
]
