"""Write notebooks/published_checkpoints.ipynb (run: python notebooks/make_published_notebook.py).

The notebook only calls entropy_jax and experiments/import_hf.py; edit the cells here and
regenerate rather than editing the .ipynb by hand.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from make_notebook import build

CELLS: list[tuple[str, str]] = [
    ("md", """# Published checkpoints: import, probe, phases, lineage

Imports published Hugging Face revisions (any registered family: GPT-NeoX/Pythia, GPT-2, Llama,
OLMo-2, Qwen2, Mistral) into workdirs, probes them, draws the base model's phase trajectories and
the published post-training lineage (base -> SFT -> DPO -> Instruct) on one axis.

Inputs, from environment variables:
* `ENTROPY_JAX_BASE`: base revision folders (`:`-separated, named like `stage1-step140000-tokens588B`);
* `ENTROPY_JAX_STAGES`: `stage=folder` pairs (`:`-separated), e.g. `sft=/data/OLMo-2-1124-7B-SFT`;
* `ENTROPY_JAX_TEXT`: the probe text folder; `ENTROPY_JAX_OUT`: where the workdirs go.

Without them it runs on the tiny random OLMo-2 fixture of the tests (`tests/testdata/hf/olmo2`),
every stage a copy of it: the pipeline, not a finding. For Hub downloads use
`python experiments/import_hf.py --hf_model=... --revisions=...` (README) and point
`ENTROPY_JAX_BASE` / `ENTROPY_JAX_STAGES` at nothing: set `ENTROPY_JAX_WORKDIRS` to the imported
workdirs (root first) instead."""),
    ("code", """%matplotlib inline
import os
import shutil
import sys
from pathlib import Path

from IPython.display import display

REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
sys.path.insert(0, str(REPO))
from entropy_jax.analysis import lifecycle, phases, plots, results  # noqa: E402
from entropy_jax.sweep import sweep  # noqa: E402
from experiments import import_hf  # noqa: E402

OUT = Path(os.environ.get("ENTROPY_JAX_OUT", REPO / "runs" / "published"))
FIXTURE = REPO / "tests" / "testdata" / "hf" / "olmo2"
TEXT = os.environ.get("ENTROPY_JAX_TEXT", str(REPO / "tests" / "testdata" / "hf" / "text"))
PROBE_SET = dict(seq_len=16, num_sequences=24, batch_size=8) if "ENTROPY_JAX_TEXT" not in os.environ else {}


def fixture_copy(name):
    folder = OUT / "revisions" / name
    if not folder.exists():
        shutil.copytree(FIXTURE, folder)
    return str(folder)


BASE = os.environ.get("ENTROPY_JAX_BASE", "").split(":") if os.environ.get("ENTROPY_JAX_BASE") else [
    fixture_copy("stage1-step1000-tokens4B")]
STAGES = [pair.split("=", 1) for pair in os.environ.get("ENTROPY_JAX_STAGES", "").split(":") if pair] or [
    (stage, fixture_copy(f"OLMo-2-{name}")) for stage, name in (("sft", "SFT"), ("dpo", "DPO"), ("rlvr", "Instruct"))]
print("base:", BASE)
print("stages:", STAGES)"""),
    ("md", """## Import

The base revisions become the root workdir (step and tokens from the revision names); each stage
is imported under the one before (`--stage`, `--parent`), probed on the root's sequences.
Importing again skips what is already there."""),
    ("code", """if os.environ.get("ENTROPY_JAX_WORKDIRS"):
    WORKDIRS = [Path(w) for w in os.environ["ENTROPY_JAX_WORKDIRS"].split(":")]
else:
    WORKDIRS = [OUT / "base"]
    import_hf.import_folders(BASE, WORKDIRS[0], text_dir=TEXT, **PROBE_SET)
    for stage, folder in STAGES:
        WORKDIRS.append(OUT / stage)
        import_hf.import_folders([folder], WORKDIRS[-1], stage=stage, parent=str(WORKDIRS[-2]))
print(" -> ".join(str(w) for w in WORKDIRS))"""),
    ("md", """## Probe

The unchanged sweep over every workdir (rows already in a table are skipped)."""),
    ("code", """for w in WORKDIRS:
    report = sweep(w)
    print(w.name, "probed steps", report.probed_steps)"""),
    ("md", """## Phase trajectories of the base model"""),
    ("code", """table = results.load_results(WORKDIRS[0])
PROBE = results.default_probe(table)
LAYER = results.final_layer(table, PROBE)
phase_table = phases.detect_phases(table)
print(phases.format_phases(phase_table))
display(plots.make_trajectory_figure(table, None, phase_table, probe=PROBE, layer=LAYER))"""),
    ("md", """## The published lineage on one axis

`probes/stages.csv` of the last stage, and the lifecycle figures (each stage its own span)."""),
    ("code", """report = lifecycle.analyse_lineage(WORKDIRS[-1])
print(report)
stages_table, _ = lifecycle.lineage_results(WORKDIRS)
for layer in lifecycle.summary_layers(stages_table, PROBE):
    display(lifecycle.make_lifecycle_figure(stages_table, probe=PROBE, layer=layer))"""),
]

if __name__ == "__main__":
    path = Path(__file__).with_name("published_checkpoints.ipynb")
    notebook = build(CELLS)
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    print(f"wrote {path}")
