"""Write notebooks/phase_trajectories.ipynb (run: python notebooks/make_notebook.py).

The notebook only calls entropy_jax.analysis; edit the cells here and regenerate rather than editing
the .ipynb by hand, so the two never drift apart.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS: list[tuple[str, str]] = [
    ("md", """# Phase trajectories of a run

Draws, from a run's probe results table, the figures of `entropy_jax.analysis.plots` and the phase
table of `entropy_jax.analysis.phases` (warmup / entropy-seeking / compression-seeking, Li et al. 2025).
The run directory comes from the `ENTROPY_JAX_WORKDIR` environment variable; by default it is
`runs/demo`, the directory the one-command demo writes. All logic lives in the library."""),
    ("code", """%matplotlib inline
import os
import sys
from pathlib import Path

from IPython.display import display

# Run from the repository root or from notebooks/; make the package importable without installing it.
REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
sys.path.insert(0, str(REPO))
from entropy_jax.analysis import phases, plots, results  # noqa: E402

WORKDIR = Path(os.environ.get("ENTROPY_JAX_WORKDIR", REPO / "runs" / "demo"))
table = results.load_results(WORKDIR)
train_metrics = results.load_optional(results.load_train_metrics, WORKDIR, "the loss curve")
spectra = results.load_optional(results.load_spectra, WORKDIR, "the eigenspectra")
PROBE = results.default_probe(table)
LAYER = results.final_layer(table, PROBE)
print(f"{WORKDIR}: {len(table)} rows, probes {sorted(table['probe'].unique())}")
print(f"showing probe {PROBE}, layer {LAYER}")"""),
    ("md", """## Phase table

Segments of the smoothed RankMe trajectory (running median over 3 checkpoints, turning points at a
10 % relative move) labelled by the direction of RankMe and alpha-ReQ; `unclassified` marks a
segment whose RankMe moved less than 10 % or whose alpha did not move the opposite way."""),
    ("code", """phase_table = phases.detect_phases(table, train_metrics=train_metrics)
print(phases.format_phases(phase_table))"""),
    ("md", """## RankMe and alpha-ReQ against log step

Top: RankMe (effective rank of the probe representation) with the loss minus the corpus entropy rate
(nats/token; how far the model is from optimal) on the right axis. Bottom: alpha-ReQ, the power-law
decay exponent of the covariance eigenspectrum. Shaded spans are the phases of the table above."""),
    ("code", """display(plots.make_trajectory_figure(
    table, train_metrics, phase_table, probe=PROBE, layer=LAYER))"""),
    ("md", """## RankMe by layer

One row per layer (0 = embedding output, L = after the final norm), one column per checkpoint."""),
    ("code", """display(plots.make_layer_heatmap_figure(
    plots.rankme_by_layer(table, PROBE), title=f"RankMe by layer: probe {PROBE}",
    colorbar_label="RankMe (effective rank)", layer_label="layer (0 = embedding, L = after final norm)"))"""),
    ("md", """## Attention entropy

Mean attention entropy (nats) per layer and checkpoint, then each head's entropy (solid) against its
Zhai et al. (2023) Theorem 3.1 lower bound (dashed); the bound must stay below the measurement. Skipped
when the sweep recorded no attention rows."""),
    ("code", """if "attention_entropy" in set(table["metric"]):
    display(plots.make_layer_heatmap_figure(
        plots.attention_entropy_by_layer(table), title="Mean attention entropy by layer",
        colorbar_label="attention entropy (nats)", layer_label="layer (transformer block)"))
    if set(table["metric"]) & set(plots.BOUND_METRICS):
        display(plots.make_attention_bound_figure(table))
else:
    print("no attention rows in this results table")"""),
    ("md", """## Eigenspectra

Normalised covariance eigenvalues against rank (log-log) at a few checkpoints, coloured by step: a
steeper line is a larger alpha-ReQ, a flatter one a higher effective rank."""),
    ("code", """key = f"{PROBE}_layer{LAYER}"
if spectra is not None and any(key in arrays for arrays in spectra.values()):
    display(plots.make_spectra_figure(spectra, key=key))
else:
    print(f"no spectra named {key}")"""),
    ("md", """## Lifecycle: pretraining, SFT, DPO, RLVR

`python run.py` fine-tunes the pretrained model in stages, each in its own workdir
(`<workdir>-sft`, `-dpo`, `-rlvr`) and each started from the one before; every stage is probed on
the same probe sequences. Following the parents recorded in the checkpoints from the last stage
(`ENTROPY_JAX_LIFECYCLE`, by default `<workdir>-rlvr`) gives the lineage: one table, RankMe and
alpha-ReQ on one cumulative-token axis (each stage on its own log scale, shaded), and each stage's
start and end values (Li et al. 2025 report SFT and DPO expanding the representations, RLVR
compressing them)."""),
    ("code", """from entropy_jax.analysis import lifecycle  # noqa: E402

LEAF = Path(os.environ.get("ENTROPY_JAX_LIFECYCLE", f"{WORKDIR}-rlvr"))
chain = lifecycle.lineage_workdirs(LEAF) if (LEAF / "checkpoints").is_dir() else [WORKDIR]
if len(chain) > 1:
    stages_table, digest = lifecycle.lineage_results(chain)
    print(" -> ".join(w.name for w in chain), f"(probe set sha256 {digest[:12]})")
    layers = lifecycle.summary_layers(stages_table, PROBE)
    print(lifecycle.format_stage_summary(lifecycle.stage_summary(stages_table, probe=PROBE, layers=layers)))
    for layer in layers:
        display(lifecycle.make_lifecycle_figure(stages_table, probe=PROBE, layer=layer))
else:
    print(f"no fine-tuning stages after {WORKDIR}: run python run.py (all stages) first")"""),
]


def build(cells_source: list[tuple[str, str]] | None = None) -> nbformat.NotebookNode:
    """The notebook of ``cells_source`` (default this one's cells), with a python3 kernelspec and no outputs."""
    cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells_source or CELLS]
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


if __name__ == "__main__":
    path = Path(__file__).with_name("phase_trajectories.ipynb")
    notebook = build()
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    print(f"wrote {path}")
