"""Rendering shared by the report's sections: markdown tables and matplotlib figures written as PNG."""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.figure import Figure

from fedjax_code.records import write_atomic


def markdown_table(header, rows) -> str:
    def cell(v):  # a float to 4 digits, NaN (no value) as blank
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]) + "\n"


def subplots(ncols: int):
    """A figure of its own (matplotlib's object API: no pyplot state, no backend switch for notebook users)."""
    fig = Figure(figsize=(6.5 * ncols, 4.5))
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def save(fig, axes, path: Path) -> None:
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())
