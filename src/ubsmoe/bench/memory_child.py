"""Subprocess entry of the ``server_memory`` suite: ``python -m ubsmoe.bench.memory_child N SIZES SEED``.

Runs :func:`ubsmoe.bench.server.aggregate_synthetic` alone in this process (so that
its peak RSS is the measurement) and prints its figures as one JSON line. ``SIZES``
is a JSON object of :func:`ubsmoe.bench.server.adapter_shapes` keyword arguments.
"""

from __future__ import annotations

import json
import sys

from ubsmoe.bench.server import aggregate_synthetic

if __name__ == "__main__":
    num_clients, sizes, seed = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(aggregate_synthetic(num_clients, sizes, seed=seed)))
