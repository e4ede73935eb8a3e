"""Stopping a run's processes: the ClientApp workers named in the run's metrics are stopped too."""

from __future__ import annotations

import json
import subprocess
import sys

from ubsmoe.fl.run_dir import METRICS_FILE
from ubsmoe.fl.simulation import stop_process_tree, worker_pids


def test_worker_pids_are_read_from_the_train_records(tmp_path):
    records = [{"type": "train", "round": 1, "clients": [{"id": 0, "pid": 101.0}, {"id": 1, "pid": 102.0}]},
               {"type": "eval", "round": 1},
               {"type": "train", "round": 2, "clients": [{"id": 0, "pid": 101.0}, {"id": 2}]}]
    (tmp_path / METRICS_FILE).write_text("\n".join(json.dumps(r) for r in records) + "\n{broken")
    assert worker_pids(tmp_path) == {101, 102}
    assert worker_pids(tmp_path / "missing") == set()


def test_a_listed_pid_that_is_no_ray_worker_is_left_alone():
    """A recycled pid (here: a plain Python process) is not signalled as a worker."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert stop_process_tree([], timeout=1.0, workers={other.pid}) == []
        assert other.poll() is None  # still running
    finally:
        other.kill()
        other.wait()
