"""The plots' log axes: a panel with no positive figure stays linear instead of warning
and drawing an empty log scale."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rag.harness.plots import log_axis


def test_a_log_axis_needs_a_positive_figure_on_it():
    fig, (empty, drawn) = plt.subplots(1, 2)
    drawn.plot([1, 10, 100], [0.2, 1.5, 30.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_axis(empty)
        log_axis(drawn)
        log_axis(drawn, "x")
        fig.canvas.draw()
    assert empty.get_yscale() == "linear"
    assert drawn.get_yscale() == "log" and drawn.get_xscale() == "log"
    plt.close(fig)
