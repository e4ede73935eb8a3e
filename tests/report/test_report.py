"""Cross-run report (`ubsmoe report DIR...`): tables, paper numbers, figures, incomplete runs.

The run directories are made once per session by real tiny federated runs
(library path: Server + ClientRuntime, as tests/fl/test_fl.py), 2 methods x 2 seeds.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import struct
from pathlib import Path

import pytest
from conftest import run_rounds
from typer.testing import CliRunner

from ubsmoe.cli import app
from ubsmoe.config import load_config
from ubsmoe.report.build import build_report
from ubsmoe.report.figures import FIGURES
from ubsmoe.report.runs import find_runs, group_runs
from ubsmoe.report.tables import format_cell, load_paper_tables

METHODS = ("smoe", "ubsmoe")
SEEDS = (0, 1)
TINY = [
    "data.tasks=[boolq,piqa]",
    "data.train_examples=64",
    "data.max_length=64",
    "fl.num_clients=2",
    "fl.rounds=2",
    "train.batch_size=4",
    "train.max_local_steps=2",
    "eval.examples_per_task=4",
    "eval.max_new_tokens=2",
    "eval.batch_size=8",
    "eval.protocols=[loglik,loss]",  # loss too, so its figure is drawn (FIGURE_NAMES)
    "model.tiny.vocab_size=512",
]
FIGURE_NAMES = [fn.__name__[4:] for fn in FIGURES] + ["flops_params"]


def _cell(method: str, seed: int, experiment: str = "report_test", **settings) -> dict:
    """A cell.json as `ubsmoe sweep` writes it."""
    return {"experiment": experiment, "scale": "tiny", "label": f"{method} seed {seed}",
            "settings": {"method": method, "rounds": 2, **settings}, "seed": seed,
            "config_hash": f"{method}-{seed}"}


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    """root/{method}_s{seed}: 4 finished tiny runs with cell.json, plus root/unfinished (no summary)."""
    root = tmp_path_factory.mktemp("report_runs")
    cache = tmp_path_factory.mktemp("report_tok")
    for method in METHODS:
        for seed in SEEDS:
            cfg = load_config(overrides=[*TINY, f"method={method}", f"train.seed={seed}",
                                         f"model.tokenizer_cache={cache}"])
            run_dir = root / f"{method}_s{seed}"
            run_rounds(cfg, run_dir, finish=True)
            (run_dir / "cell.json").write_text(json.dumps(_cell(method, seed)))
    # An unfinished run: a round logged, no summary.json.
    unfinished = root / "unfinished"
    unfinished.mkdir()
    lines = (root / "ubsmoe_s0" / "metrics.jsonl").read_text().splitlines()
    (unfinished / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    shutil.copy(root / "ubsmoe_s0" / "config.yaml", unfinished / "config.yaml")
    (unfinished / "cell.json").write_text(json.dumps(_cell("ubsmoe", 2)))
    return root


@pytest.fixture(scope="session")
def report(runs_root, tmp_path_factory):
    """The report of the session's runs."""
    return build_report([runs_root], tmp_path_factory.mktemp("report_out") / "report")


def _summaries(root: Path, method: str) -> list[dict]:
    return [json.loads((root / f"{method}_s{s}" / "summary.json").read_text()) for s in SEEDS]


def _read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text(encoding="utf-8").splitlines()))


def test_cells_are_mean_and_std_over_seeds_of_the_summaries(runs_root, report):
    assert len(report.groups) == 1 and report.groups[0].methods == list(METHODS)
    long = list(csv.DictReader((report.out / "accuracy_long.csv").read_text().splitlines()))
    tasks_grid = _read_csv(report.out / "g1_tasks_loglik_budget.csv")
    budgets_grid = _read_csv(report.out / "g1_budgets_loglik_budget.csv")
    for method in METHODS:
        sums = _summaries(runs_root, method)
        # Tasks table: a run's task value is its per-task accuracy averaged over the budget levels.
        for task in ("boolq", "piqa"):
            per_seed = [statistics.fmean(r["per_task"][task] for r in s["accuracy"] if r["protocol"] == "loglik")
                        for s in sums]
            row = next(r for r in long if r["shape"] == "tasks" and r["row"] == task and r["method"] == method
                       and r["protocol"] == "loglik")
            assert float(row["mean"]) == pytest.approx(statistics.fmean(per_seed), abs=1e-12)
            assert float(row["std"]) == pytest.approx(statistics.stdev(per_seed), abs=1e-12)
            assert row["n"] == "2" and row["seeds"] == "0 1"
            header, line = tasks_grid[1], next(r for r in tasks_grid if r[0] == task)
            cell = line[header.index(f"{method} (ours)")]
            assert cell == format_cell(per_seed) and cell.endswith("(n=2)")
        # Budgets table: a run's value at level beta is its average over tasks there.
        for beta in (0.125, 1.0):
            per_seed = [next(r["average"] for r in s["accuracy"] if r["budget"] == beta and r["protocol"] == "loglik")
                        for s in sums]
            header, line = budgets_grid[1], next(r for r in budgets_grid if r[0] == f"beta={beta:g}")
            assert line[header.index(f"{method} (ours)")] == format_cell(per_seed)
            assert line[1] == f"K={int(8 * beta)} r=20"  # K_j and the rank it ran at
    assert budgets_grid[0][0].startswith("# ") and "protocol loglik" in budgets_grid[0][0]
    md = report.markdown.read_text()
    assert "Evaluation protocol: loglik" in md and "(n=2)" in md


def test_format_cell_hand_computed():
    assert format_cell([0.25, 0.75]) == "0.5000 ± 0.3536 (n=2)"
    assert format_cell([0.4]) == "0.4000 ± - (n=1)"


def test_incomplete_run_is_listed_not_tabled(runs_root, report):
    assert [r.path.name for r in report.incomplete] == ["unfinished"]
    md = report.markdown.read_text()
    assert f"{runs_root / 'unfinished'}: ubsmoe, 1 round(s) logged" in md
    assert "incomplete (no summary.json)" in md
    assert all(r.path.name != "unfinished" for g in report.groups for r in g.runs)


def test_every_figure_is_a_png_of_reasonable_size(report):
    written = {f.name: f for f in report.figures}
    assert sorted(written) == sorted(FIGURE_NAMES)
    for name in FIGURE_NAMES:
        path = report.out / f"g1_{name}.png"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 600 and height >= 400, (name, width, height)
        assert 10_000 < len(data) < 2_000_000, (name, len(data))
        assert f"]({path.name})" in report.markdown.read_text()
    # Two entropy panels (per-layer mean, over all layer-expert pairs); 'global_max' is the
    # second panel's reference line, not a third panel: 2 x 6.4 in x 120 dpi wide.
    diag = next(r for r in report.groups[0].runs[0].records("diagnostics"))
    assert {"global", "global_max"} <= set(diag["entropy"])
    png = (report.out / "g1_entropy_per_round.png").read_bytes()
    assert struct.unpack(">I", png[16:20])[0] == 2 * 768
    assert "not logged" not in report.markdown.read_text()


@pytest.mark.slow
def test_paper_numbers_sit_beside_ours_for_a_matching_setting(runs_root, tmp_path):
    """Runs whose summary names OLMoE-1B-7B get Table 1 (tasks) and Tables 1/3 (budgets) numbers."""
    root = tmp_path / "olmoe"
    for method in METHODS:
        for seed in SEEDS:
            src, dst = runs_root / f"{method}_s{seed}", root / f"{method}_s{seed}"
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
            summary = json.loads((dst / "summary.json").read_text())
            summary["model"] = "allenai/OLMoE-1B-7B-0924"
            if (method, seed) == ("ubsmoe", 0):
                summary["provenance"] = {"versions": {"torch": "9.9"}, "git_commit": "abc123",
                                         "device": "cpu", "command": "ubsmoe run", "python": "3.x",
                                         "platform": "linux"}
            elif (method, seed) == ("smoe", 1):  # a run from before provenance was recorded
                summary.pop("provenance", None)
            (dst / "summary.json").write_text(json.dumps(summary))
    rep = build_report([root], tmp_path / "out")
    paper = load_paper_tables()
    assert {"source", "table", "setting", "row", "method", "metric", "value"} <= set(paper[0])

    def published(table, row):
        return next(p for p in paper if p["table"] == table and p["row"] == row and p["method"] == "UB-SMoE")

    long = [r for r in csv.DictReader((rep.out / "accuracy_long.csv").read_text().splitlines())
            if r["protocol"] == "loglik"]  # the loss rows never get a published number
    assert not any(r["paper_value"] for r in csv.DictReader((rep.out / "accuracy_long.csv").read_text().splitlines())
                   if r["protocol"] == "loss")
    avg = [r for r in long if r["shape"] == "tasks" and r["row"] == "average" and r["method"] == "ubsmoe"]
    assert len(avg) == 1 and float(avg[0]["paper_value"]) == float(published("1", "average")["value"])
    assert avg[0]["paper_source"] == published("1", "average")["source"] and avg[0]["paper_table"] == "1"
    low = {r["paper_table"]: r for r in long if r["shape"] == "budgets" and r["row"] == "beta=0.125"
           and r["method"] == "ubsmoe"}
    assert list(low) == ["3"] and float(low["3"]["paper_value"]) == float(published("3", "beta_1")["value"])
    top = [r for r in long if r["shape"] == "budgets" and r["row"] == "beta=1" and r["method"] == "ubsmoe"]
    assert [r["paper_row"] for r in top] == ["beta_4"]
    smoe = [r for r in long if r["method"] == "smoe"]
    assert smoe and all(r["paper_value"] == "" for r in smoe)  # naive SMoE has no published column
    grid = _read_csv(rep.out / "g1_tasks_loglik_budget.csv")
    line = next(r for r in grid if r[0] == "average")
    assert line[grid[1].index("ubsmoe (paper UB-SMoE)")] == \
        f"{float(published('1', 'average')['value']):.4f} (Table 1)"
    assert line[grid[1].index("smoe (paper -)")] == "no match"
    md = rep.markdown.read_text()
    assert "git_commit: abc123" in md and "versions: torch 9.9" in md and "not recorded" in md


def test_tiny_setting_has_no_paper_match_and_says_so(report):
    long = list(csv.DictReader((report.out / "accuracy_long.csv").read_text().splitlines()))
    assert long and all(r["paper_value"] == "" for r in long)
    assert "No published number matches this setting" in report.markdown.read_text()


def test_grouping_by_cell_settings_and_without_cell(runs_root, tmp_path):
    root = tmp_path / "groups"
    for name, cell in (("a", _cell("smoe", 0, lr=0.001)), ("b", _cell("smoe", 0, lr=0.01)),
                       ("c", _cell("ubsmoe", 1, lr=0.01)), ("d", None)):
        src = runs_root / ("ubsmoe_s1" if name == "c" else "smoe_s0")
        shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("checkpoints", "cell.json"))
        if cell is not None:
            (root / name / "cell.json").write_text(json.dumps(cell))
    groups = group_runs(find_runs([root]))
    by_label = {g.label: sorted(r.path.name for r in g.runs) for g in groups}
    assert sorted(by_label.values()) == [["a"], ["b", "c"], ["d"]]
    assert any(label.startswith("model=tiny, clients=2") for label in by_label)


@pytest.mark.slow
def test_missing_diagnostics_skip_figures_and_say_so(runs_root, tmp_path):
    root = tmp_path / "nodiag"
    shutil.copytree(runs_root / "smoe_s0", root / "smoe_s0", ignore=shutil.ignore_patterns("checkpoints"))
    metrics = root / "smoe_s0" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["type"] != "diagnostics"))
    rep = build_report([root], tmp_path / "out")
    skipped = {f.name for f in rep.figures if f.path is None}
    assert skipped == {"entropy_per_round", "entropy_per_layer", "gini_per_round", "phi_vs_utilization",
                       "pg_alignment"}
    md = rep.markdown.read_text()
    assert "not drawn (no diagnostics records with utilization entropy)" in md
    assert "not drawn (no method with phi (UB-SMoE) among these runs)" in md
    assert (tmp_path / "out" / "g1_train_loss.png").is_file()


@pytest.mark.slow
def test_a_dense_run_beside_an_smoe_run_is_reported(runs_root, tmp_path):
    """A dense backbone logs diagnostics with no experts (utilization [] only): no figure breaks."""
    root = tmp_path / "mixed"
    for name in ("smoe_s0", "ubsmoe_s0"):
        shutil.copytree(runs_root / name, root / name, ignore=shutil.ignore_patterns("checkpoints"))
    metrics = root / "smoe_s0" / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({"type": "diagnostics", "round": r["round"], "utilization": []}
                                          if r["type"] == "diagnostics" else r) + "\n" for r in lines))
    rep = build_report([root], tmp_path / "out")
    drawn = {f.name for f in rep.figures if f.path is not None}
    assert {"entropy_per_round", "gini_per_round", "phi_vs_utilization"} <= drawn  # from the ubsmoe run
    assert (tmp_path / "out" / "g1_entropy_per_round.png").is_file()


@pytest.mark.slow
def test_cli_report_single_run_and_errors(runs_root, tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "one"
    shutil.copytree(runs_root / "ubsmoe_s0", run_dir)
    res = runner.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "accuracy (loglik)" in res.output  # the single run's own table, as before
    assert (run_dir / "report" / "report.md").is_file()
    res = runner.invoke(app, ["report", str(runs_root), str(run_dir)])
    assert res.exit_code == 2 and "--out: required with several DIRs" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "is not a directory" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["report", str(empty)])
    assert res.exit_code == 2 and "no run directory" in res.output
    bad = tmp_path / "bad"
    shutil.copytree(runs_root / "smoe_s1", bad, ignore=shutil.ignore_patterns("checkpoints"))
    (bad / "cell.json").write_text(json.dumps({"experiment": "x"}))
    res = runner.invoke(app, ["report", str(bad)])
    assert res.exit_code == 2 and "cell.json: missing scale" in res.output


def test_eval_utilization_tables_are_mean_and_std_over_seeds(runs_root, report):
    """Eval-time entropy and Gini per level (same tokens for every method) sit in their own tables."""
    tables = {t.protocol: t for t in report.tables if t.protocol in ("eval_entropy", "eval_gini")}
    assert set(tables) == {"eval_entropy", "eval_gini"} and all(t.kind == "budgets" for t in tables.values())
    for protocol, key in (("eval_entropy", "entropy"), ("eval_gini", "gini")):
        grid = _read_csv(report.out / f"g1_budgets_{protocol}_budget.csv")
        for method in METHODS:
            for beta in (0.125, 1.0):
                per_seed = [next(r["utilization"][key]["mean"] for r in s["accuracy"] if r["budget"] == beta)
                            for s in _summaries(runs_root, method)]
                line = next(r for r in grid if r[0] == f"beta={beta:g}")
                assert line[grid[1].index(f"{method} (ours)")] == format_cell(per_seed)
                assert line[1] == f"K={int(8 * beta)}"
    assert "same tokens for every method" in report.markdown.read_text()
