"""Analysis of probe results: load the tables, segment training phases, draw the plots.

``results`` reads a workdir, ``phases`` labels warmup / entropy-seeking / compression-seeking segments
of RankMe and alpha-ReQ trajectories (Li et al. 2025), ``plots`` draws PNG figures.
"""

from entropy_jax.analysis.phases import detect_phases, format_phases, write_phases
from entropy_jax.analysis.plots import plot_all
from entropy_jax.analysis.report import Report, analyse, check_plot_request
from entropy_jax.analysis.results import load_results, load_spectra, load_train_metrics

__all__ = [
    "Report",
    "analyse",
    "check_plot_request",
    "detect_phases",
    "format_phases",
    "load_results",
    "load_spectra",
    "load_train_metrics",
    "plot_all",
    "write_phases",
]
