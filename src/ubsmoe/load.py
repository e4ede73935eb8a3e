"""Moved to :mod:`ubsmoe.finished_run` (reuse a finished run); kept until ``ubsmoe/__init__.py`` names it.

``ubsmoe.load_run`` / ``save_base_model`` / ``evaluate_run`` are imported lazily by
``ubsmoe/__init__.py`` from this path; once that file points at
``ubsmoe.finished_run``, delete this module.
"""

from ubsmoe.finished_run import evaluate_run, load_run, save_base_model

__all__ = ["evaluate_run", "load_run", "save_base_model"]
