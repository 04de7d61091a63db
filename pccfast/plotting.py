"""The one place matplotlib is loaded: the run report and the study report draw through it.

Plots are optional: without matplotlib the reports keep their tables and say why they have no
figures (``plots_missing``).
"""

from __future__ import annotations

import importlib.util


def plots_missing() -> str | None:
    """Why reports would have no plots (matplotlib missing), else None."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "matplotlib is not installed (pip install matplotlib)"


def pyplot():
    """matplotlib.pyplot on the file-only backend (Agg), or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
