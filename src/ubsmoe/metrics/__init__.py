"""Diagnostics: FLOP counting (and, later, utilization statistics)."""
