"""Use a finished run again: load its model at a budget level, rebuild its base, re-evaluate it.

What plain transformers + PEFT cannot express (K below the native top-k, UB-SMoE's
DMR modulation phi, rank r_j of a rank method's level) needs the SMoE patch:
:func:`load_run` rebuilds the run's server (its config, latest round checkpoint,
method state, base merges) and puts the model in the state a budget level is
evaluated in. :func:`evaluate_run` scores it again with the Server's own evaluation
path (:meth:`ubsmoe.fl.server.Server.score_levels`). No Flower is involved.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ubsmoe.config import RunConfig, config_from_dict, load_saved_config
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client_runtime import shared_setup
from ubsmoe.fl.run_dir import CONFIG_FILE
from ubsmoe.fl.server import Server
from ubsmoe.io import atomic_write_json
from ubsmoe.models import load_adapter_state, set_top_k
from ubsmoe.models.adapters import set_lora_rank
from ubsmoe.models.build import base_model


def _run_config(run_dir: Path, device: str | None = None, eval_overrides: dict[str, Any] | None = None
                ) -> RunConfig:
    """The run's ``config.yaml``, with ``model.device`` and ``eval.*`` overrides (validated).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.yaml``.
        ConfigError: an override is invalid.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"run_dir: {str(run_dir)!r} has no {CONFIG_FILE} (not a ubsmoe run directory)")
    cfg = load_saved_config(path)
    if device is None and not eval_overrides:
        return cfg
    tree = cfg.to_dict()
    if device is not None:
        tree["model"]["device"] = device
    for key, value in (eval_overrides or {}).items():
        tree["eval"][key] = value
    return config_from_dict(tree)


def budget_level(cfg: RunConfig, budget: float) -> int:
    """The 0-based level of ``budget`` in ``fl.budgets``.

    Raises:
        ConfigError: ``budget`` is not one of the run's budgets (one line, the allowed values).
    """
    for j, beta in enumerate(cfg.fl.budgets):
        if abs(float(beta) - float(budget)) <= 1e-9:
            return j
    raise ConfigError(f"budget: got {budget!r}, expected one of the run's fl.budgets "
                      f"{', '.join(f'{b:g}' for b in cfg.fl.budgets)}")


def _server(run_dir: Path, cfg: RunConfig):
    """The run's :class:`~ubsmoe.fl.server.Server` at its latest round checkpoint."""
    return Server(cfg, Path(run_dir), shared_setup(cfg), resume=True)


def load_run(run_dir: str | Path, budget: float | None = None, device: str | None = None):
    """The run's final model, ready for ``generate``, and its tokenizer.

    The model is the run's own (SMoE-patched ``OlmoeForCausalLM``, possibly inside a
    PEFT wrapper for attention LoRA) built from ``config.yaml`` and the latest round
    checkpoint in ``checkpoints/`` (adapters, router, phi, the method's state and
    base-weight merges), in eval mode:

    - ``budget=None``: the global model as exported (global LoRA rank, the native
      top-k, phi when the method has DMR);
    - ``budget=beta``: as level beta is evaluated (:meth:`Server.set_level`): K_j of
      that level (``top_k_for_budget``), the LoRA rank r_j and the adapters a client
      of that level holds (rank methods), phi.

    Args:
        run_dir: a run directory with ``config.yaml`` and a round checkpoint.
        budget: one of the run's ``fl.budgets``, or None.
        device: ``model.device`` override (``cpu``, ``cuda``, ``cuda:N``, ``auto``;
            None: the run's).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: no ``config.yaml`` or no round checkpoint in ``run_dir``.
        ConfigError: ``budget`` not among the run's budgets, or a bad ``device``.
    """
    cfg = _run_config(Path(run_dir), device)
    level = None if budget is None else budget_level(cfg, budget)
    server = _server(Path(run_dir), cfg)
    if level is None:
        server.sync_base()
        set_lora_rank(server.model, *server.global_lora, seed=cfg.train.seed + 1)
        load_adapter_state(server.model, server.state.adapters)
        set_top_k(server.model, server.k_max)
    else:
        server.set_level(level, server.state.round)
    server.model.eval()
    return server.model, server.tokenizer


def save_base_model(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the run's unpatched base model and tokenizer with ``save_pretrained``.

    For a ``model.init=random`` run (a preset such as ``tiny``) this rebuilds the
    exact random weights (seed ``train.seed``, the run's trained tokenizer), so
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` + ``PeftModel.from_pretrained``
    loads the exported adapter (``checkpoints/adapter``) without ubsmoe.

    Args:
        run_dir: a run directory.
        out_dir: the folder to write (created).

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.yaml``.
    """
    cfg = _run_config(Path(run_dir), "cpu")
    model, tokenizer = base_model(cfg.model, shared_setup(cfg).tokenizer, seed=cfg.train.seed)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def evaluate_run(run_dir: str | Path, budget: float | None = None, tasks: Sequence[str] | None = None,
                 protocol: str | None = None, examples_per_task: int | None = None,
                 device: str | None = None, write: bool = True) -> dict[str, Any]:
    """Evaluate a finished run again with the Server's evaluation (``ubsmoe eval``).

    Same seeded test subsets, budget levels (K_j, r_j), modes (``eval.top_k``) and
    scoring as the run's own final evaluation, so with the run's settings the rows
    equal the summary's ``accuracy`` (deterministic on CPU).

    Args:
        run_dir: a run directory with a round checkpoint.
        budget: score only this level (one of ``fl.budgets``; None: all).
        tasks: score only these tasks (None: the run's).
        protocol: ``generation``, ``loglik`` or ``loss`` (None: the run's ``eval.protocols``).
        examples_per_task: test examples per task (0: all; None: the run's).
        device: ``model.device`` override (None: the run's).
        write: also write ``RUN_DIR/eval_<UTC timestamp>.json`` atomically.

    Returns:
        ``{"run_dir", "round", "method", "settings", "accuracy": rows, "path"}``; rows
        as :meth:`Server.score_levels` (``budget``, ``top_k``, ``top_k_mode``,
        ``lora_rank``, ``protocol``, ``per_task``, ``average``, ``n``).

    Raises:
        FileNotFoundError: no ``config.yaml`` or no round checkpoint.
        ConfigError: a bad budget, protocol, examples count or device (one line).
        ValueError: a task not among the run's test sets.
    """
    overrides: dict[str, Any] = {}
    if protocol is not None:
        overrides["protocols"] = [protocol]
    if examples_per_task is not None:
        overrides["examples_per_task"] = examples_per_task
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir, device, overrides)
    levels = None if budget is None else [budget_level(cfg, budget)]
    server = _server(run_dir, cfg)
    rows = server.score_levels(server.state.round, levels=levels, tasks=tasks)
    rows = [{k: v for k, v in row.items() if k != "type"} for row in rows]
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "round": server.state.round,
        "method": cfg.method,
        "settings": {"budget": budget, "tasks": list(tasks) if tasks is not None else None,
                     "protocols": cfg.eval.protocols, "examples_per_task": cfg.eval.examples_per_task,
                     "top_k": cfg.eval.top_k, "device": cfg.model.device},
        "accuracy": rows,
    }
    if write:
        stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
        path, n = run_dir / f"eval_{stamp}.json", 1
        while path.exists():  # two evaluations within one second keep both files
            path, n = run_dir / f"eval_{stamp}_{n}.json", n + 1
        result["path"] = str(path)
        atomic_write_json(path, result)
    return result
