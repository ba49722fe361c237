"""notebooks/published_checkpoints.ipynb runs top to bottom on the tiny OLMo-2 fixture: it imports
a base and three published stages, probes them and draws the phases and the lineage."""

import pandas as pd
from conftest import execute_notebook


def test_published_checkpoints_notebook_runs_on_the_fixtures(tmp_path, monkeypatch):
    execute_notebook(tmp_path, monkeypatch, name="published_checkpoints.ipynb", env={"ENTROPY_JAX_OUT": tmp_path},
                     timeout=600)
    summary = pd.read_csv(tmp_path / "rlvr" / "probes" / "stages.csv")
    assert list(summary.drop_duplicates("stage").stage) == ["pretrain", "sft", "dpo", "rlvr"]
    assert list((tmp_path / "rlvr" / "plots").glob("lifecycle_*.png"))
