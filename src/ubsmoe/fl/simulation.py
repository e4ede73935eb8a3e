"""Run a federated job in-process with Flower's Simulation Runtime (Ray backend)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ubsmoe.config import RunConfig
from ubsmoe.fl.server_app import ProgressFn, _noop, make_server_app
from ubsmoe.fl.train import SharedSetup, shared_setup


def run_federated(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: ProgressFn = _noop,
                  setup: SharedSetup | None = None, verbose: bool = False) -> dict[str, Any]:
    """Simulate ``cfg.fl.num_clients`` Flower SuperNodes and run the federated job.

    Args:
        cfg: validated run config.
        run_dir: run directory (created; resumed from its latest checkpoint if ``resume``).
        progress: callback ``(event, info)`` for a live display.
        setup: prebuilt data/tokenizer/partitions (built here if None).
        verbose: show Flower's and Ray's own logs.

    Returns:
        The run summary (also in ``run_dir/summary.json``).

    Raises:
        Whatever the server raised (a client failure surfaces as RuntimeError).
    """
    from flwr.simulation import run_simulation

    from ubsmoe.fl.client_app import app as client_app

    setup = setup or shared_setup(cfg)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    result: dict[str, Any] = {}
    server_app = make_server_app(cfg, Path(run_dir), setup, resume=resume, progress=progress, result=result)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.fl.num_clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.fl.client_cpus, "num_gpus": 0.0},
            "init_args": {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose},
        },
        verbose_logging=verbose,
    )
    if "error" in result:
        raise result["error"]
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a result (see its log with --verbose)")
    return result["summary"]
