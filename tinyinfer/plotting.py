"""matplotlib, imported only when a chart is asked for (it is an optional dependency)."""

import os
import sys


def pyplot():
    """matplotlib.pyplot. On the command line (no backend chosen: no MPLBACKEND, pyplot not
    yet imported) it draws to files only (Agg), so no display is needed; in a notebook it keeps
    the notebook's inline backend."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError('drawing charts needs matplotlib: pip install "tinyinfer[plot]"') from None
    if "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
