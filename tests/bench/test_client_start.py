"""A cheaper ClientApp start (issue 23 part 4): partitions cached on disk, heavy imports deferred.

Flower starts one ClientApp process per message in a deployment; whatever that
process imports or computes before training is paid by every client in every round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ubsmoe.data.partition import cached_partition_clients, partition_clients

SRC = Path(__file__).resolve().parents[2] / "src"
LABELS = ["boolq"] * 30 + ["piqa"] * 20 + ["arc"] * 10


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_cached_partitions_equal_computed_ones(tmp_path, partition):
    first = cached_partition_clients(LABELS, 4, partition, 0.5, 3, tmp_path)
    assert first == partition_clients(LABELS, 4, partition, 0.5, 3)
    files = list((tmp_path / "partitions").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == first
    assert cached_partition_clients(LABELS, 4, partition, 0.5, 3, tmp_path) == first  # read back
    # Any changed argument is another entry, not the cached one.
    other = cached_partition_clients(LABELS, 4, partition, 0.5, 4, tmp_path)
    assert len(list((tmp_path / "partitions").glob("*.json"))) == 2
    assert other == partition_clients(LABELS, 4, partition, 0.5, 4)


def test_a_bad_cache_file_is_recomputed(tmp_path):
    good = cached_partition_clients(LABELS, 4, "dirichlet", 0.5, 0, tmp_path)
    path = next((tmp_path / "partitions").glob("*.json"))
    for bad in ("not json", json.dumps([[0, 1]]), json.dumps([[0]] * 4), json.dumps([list(range(60)), [], [], []])):
        path.write_text(bad)
        assert cached_partition_clients(LABELS, 4, "dirichlet", 0.5, 0, tmp_path) == good
        assert json.loads(path.read_text()) == good  # rewritten


def test_no_cache_computes(tmp_path):
    assert cached_partition_clients(LABELS, 3, "iid", 0.5, 1, None) == partition_clients(LABELS, 3, "iid", 0.5, 1)


CHILD = r"""
import sys
from ubsmoe.fl import client_app
assert "transformers" not in sys.modules, "client_app imports transformers at load"
from ubsmoe.config import load_config
from ubsmoe.fl.client_runtime import shared_setup
cfg = load_config(overrides=sys.argv[1:])
shared_setup(cfg)
print("LOADED:" + ",".join(m for m in ("datasets", "flwr_datasets", "seaborn", "pandas") if m in sys.modules))
"""


@pytest.mark.slow
def test_a_clientapp_with_a_warm_cache_does_not_import_the_partitioners(tmp_path):
    """Fresh interpreter, as a deployed ClientApp: once the server filled the cache, no datasets stack."""
    from ubsmoe.config import load_config
    from ubsmoe.fl.client_runtime import shared_setup

    overrides = ["data.tasks=[boolq,piqa]", "data.train_examples=48", "fl.num_clients=3",
                 "model.tiny.vocab_size=512", f"model.tokenizer_cache={tmp_path}"]
    server = shared_setup(load_config(overrides=overrides))  # the ServerApp fills the cache
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD, *overrides], capture_output=True, text=True, env=env,
                         check=True, timeout=300)
    line = next(s for s in out.stdout.splitlines() if s.startswith("LOADED"))
    assert line == "LOADED:", line
    assert server.partitions == shared_setup(load_config(overrides=overrides)).partitions
