"""Third-party logs and warnings of a run go to ``run_dir/ubsmoe.log``, not the console.

:func:`route_logs` is a context manager ``ubsmoe run`` holds for the whole run:

- a file handler on the root logger and on the libraries' own loggers
  (transformers, PEFT, datasets, Flower, Ray, ...), whose console handlers are
  detached for the run and put back afterwards;
- ``logging.captureWarnings(True)`` for the run, so ``warnings.warn`` (FutureWarnings,
  DeprecationWarnings shown by the active filters, ...) is written to the log
  instead of stderr. No warning category is filtered or silenced: the filters are
  untouched, only where a shown warning goes changes, and only inside the context.

With ``verbose`` nothing is detached: the file still gets a copy, the console keeps
everything. The Flower processes' own output is sent to the same file by
:func:`ubsmoe.fl.simulation.run_federated`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_FILE = "ubsmoe.log"
# Libraries whose loggers carry their own console handlers (propagate off) or are chatty.
THIRD_PARTY_LOGGERS = ("transformers", "peft", "datasets", "huggingface_hub", "tokenizers", "flwr",
                       "ray", "torch", "accelerate", "urllib3", "filelock", "matplotlib")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_library_loggers() -> None:
    """Make libraries that add their console handler lazily (on first use) add it now.

    huggingface_hub and transformers attach a stderr handler to their root logger the
    first time one of their loggers is asked for; if that happened inside
    :func:`route_logs` (e.g. the hub client's retries while a model is looked up),
    the handler would escape the routing and print to the console.
    """
    for module in ("huggingface_hub.utils.logging", "transformers.utils.logging"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module).get_logger()


@contextmanager
def route_logs(log_path: Path, verbose: bool = False, level: int = logging.INFO) -> Iterator[Path]:
    """Send Python logging and shown warnings to ``log_path`` while the context is open.

    Args:
        log_path: the log file (appended to; its folder is created).
        verbose: keep the console handlers as they are (the file gets a copy).
        level: the lowest level written (the root logger's level is lowered to it
            for the run and restored).

    Yields:
        ``log_path``.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _configure_library_loggers()
    handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(level)
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved: dict[str, tuple[list[logging.Handler], bool]] = {}
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.propagate)
    saved_showwarning = warnings.showwarning
    try:
        if not verbose:
            for name in THIRD_PARTY_LOGGERS:
                logger = logging.getLogger(name)
                for h in list(logger.handlers):
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                        logger.removeHandler(h)
                logger.propagate = True  # to the root logger, hence the file
            root.handlers = [h for h in root.handlers
                             if not (isinstance(h, logging.StreamHandler)
                                     and not isinstance(h, logging.FileHandler))]
        else:
            for name in THIRD_PARTY_LOGGERS:  # their own handlers stay; copy them to the file
                logger = logging.getLogger(name)
                if not logger.propagate:
                    logger.addHandler(handler)
        root.addHandler(handler)
        root.setLevel(min(root.level, level) if root.level else level)
        if not verbose:
            logging.captureWarnings(True)
        yield log_path
    finally:
        if not verbose:
            logging.captureWarnings(False)
            warnings.showwarning = saved_showwarning  # exactly as before, captured or not
        root.removeHandler(handler)
        root.handlers = saved_root[1]
        root.setLevel(saved_root[0])
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()


def log_warning(message: warnings.WarningMessage) -> None:
    """Show a recorded warning the way ``warnings`` would now (inside :func:`route_logs`: the log)."""
    warnings.showwarning(message.message, message.category, message.filename, message.lineno)
