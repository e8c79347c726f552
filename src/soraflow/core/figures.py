"""Figures written like every other output: complete or not at all."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt

from soraflow.core.atomic import atomic_path

matplotlib.use("Agg")  # no display on cluster nodes (before any figure exists)


def save_figure(fig, out_png) -> None:
    """Lay out, write as PNG (temp name, then rename) and free a figure."""
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
