"""Phase segmentation on synthetic RankMe / alpha-ReQ trajectories with known phases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from entropy_jax.analysis import phases as ph

TOKENS_PER_STEP = 2048
WARMUP_STEPS = 100
# Log-spaced checkpoints, as the checkpoint schedule saves them: 0 and 2**(k/2) for k = 0..24.
STEPS = np.unique(np.concatenate([[0], np.round(2.0 ** (np.arange(25) / 2)).astype(int)]))

# Knots (step, RankMe, alpha): warmup collapse to step 45, expansion to step 800, compression to the end.
THREE_PHASES = [(0, 28.0, 0.8), (45, 12.0, 1.3), (800, 46.0, 0.6), (4096, 34.0, 1.0)]
NO_COMPRESSION = [(0, 28.0, 0.8), (45, 12.0, 1.3), (800, 46.0, 0.6), (4096, 47.0, 0.58)]
# RankMe drops late but alpha keeps falling: not a compression phase.
DROP_WITHOUT_ALPHA = [(0, 28.0, 0.8), (45, 12.0, 1.3), (800, 46.0, 0.6), (4096, 34.0, 0.5)]


def trajectory(knots: list[tuple[int, float, float]], noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """RankMe and alpha piecewise linear in log-step (log RankMe), with optional seeded noise."""
    u = np.log1p(STEPS)
    knot_u = np.log1p([k[0] for k in knots])
    rankme = np.exp(np.interp(u, knot_u, np.log([k[1] for k in knots])))
    alpha = np.interp(u, knot_u, [k[2] for k in knots])
    rng = np.random.default_rng(seed)
    rankme = rankme * np.exp(noise * rng.standard_normal(len(u)))
    alpha = alpha + noise * rng.standard_normal(len(u))
    return pd.DataFrame(dict(step=STEPS, tokens_seen=STEPS * TOKENS_PER_STEP, rankme=rankme, alpha=alpha))


def long_table(traj: pd.DataFrame, probe: str = "last_token", layer: int = 2) -> pd.DataFrame:
    """The trajectory in the tidy results-table layout (rows for rankme_cov and alpha_req)."""
    rows = []
    for metric, column in (("rankme_cov", "rankme"), ("alpha_req", "alpha")):
        rows.append(pd.DataFrame(dict(
            run="synthetic", stage="pretrain", step=traj["step"], tokens_seen=traj["tokens_seen"],
            ckpt_hash="x", probe=probe, layer=layer, head=-1, metric=metric, value=traj[column],
        )))
    return pd.concat(rows, ignore_index=True)


def segment(traj: pd.DataFrame, **kwargs) -> pd.DataFrame:
    return ph.segment_trajectory(
        traj["step"].to_numpy(), traj["tokens_seen"].to_numpy(), traj["rankme"].to_numpy(),
        traj["alpha"].to_numpy(), warmup_steps=WARMUP_STEPS, **kwargs,
    )


def labelled(table: pd.DataFrame) -> list[str]:
    return [p for p in table["phase"] if p != ph.UNCLASSIFIED]


def near(step: int, target: int) -> bool:
    """Within a factor 2 of target in step (about one checkpoint either way after smoothing)."""
    return target / 2 <= step <= target * 2


@pytest.mark.parametrize("noise,seed", [(0.0, 0), (0.03, 1), (0.03, 2), (0.03, 3)])
def test_three_phases(noise: float, seed: int) -> None:
    table = segment(trajectory(THREE_PHASES, noise, seed))
    assert labelled(table) == [ph.WARMUP, ph.ENTROPY_SEEKING, ph.COMPRESSION_SEEKING]
    by_phase = table.set_index("phase")
    assert near(by_phase.loc[ph.ENTROPY_SEEKING, "start_step"], 45)
    assert near(by_phase.loc[ph.COMPRESSION_SEEKING, "start_step"], 800)
    assert by_phase.loc[ph.COMPRESSION_SEEKING, "relative_change"] <= -0.1
    compression = by_phase.loc[ph.COMPRESSION_SEEKING]
    assert compression["alpha_end"] > compression["alpha_start"]


def test_boundaries_in_steps_and_tokens() -> None:
    table = segment(trajectory(THREE_PHASES))
    np.testing.assert_array_equal(table["start_tokens"], table["start_step"] * TOKENS_PER_STEP)
    np.testing.assert_array_equal(table["end_tokens"], table["end_step"] * TOKENS_PER_STEP)
    # Segments tile the trajectory: each starts where the previous ended.
    np.testing.assert_array_equal(table["start_step"].iloc[1:], table["end_step"].iloc[:-1])
    assert table["start_step"].iloc[0] == 0 and table["end_step"].iloc[-1] == STEPS[-1]


@pytest.mark.parametrize("noise,seed", [(0.0, 0), (0.03, 4), (0.03, 5)])
def test_no_compression_phase_is_not_invented(noise: float, seed: int) -> None:
    table = segment(trajectory(NO_COMPRESSION, noise, seed))
    assert labelled(table) == [ph.WARMUP, ph.ENTROPY_SEEKING]


@pytest.mark.parametrize("noise,seed", [(0.0, 0), (0.03, 6)])
def test_rankme_drop_without_alpha_rise_is_not_compression(noise: float, seed: int) -> None:
    table = segment(trajectory(DROP_WITHOUT_ALPHA, noise, seed))
    assert ph.COMPRESSION_SEEKING not in set(table["phase"])
    last = table.iloc[-1]
    assert last["phase"] == ph.UNCLASSIFIED and last["relative_change"] <= -0.1


def test_collapse_after_warmup_is_compression_not_warmup() -> None:
    traj = trajectory(THREE_PHASES)
    table = ph.segment_trajectory(
        traj["step"].to_numpy(), traj["tokens_seen"].to_numpy(), traj["rankme"].to_numpy(),
        traj["alpha"].to_numpy(), warmup_steps=0,
    )
    assert labelled(table) == [ph.COMPRESSION_SEEKING, ph.ENTROPY_SEEKING, ph.COMPRESSION_SEEKING]


def test_zigzag_ignores_moves_below_threshold() -> None:
    wiggle = 10.0 * (1 + 0.04 * np.sin(np.arange(30)))
    assert ph.zigzag_turning_points(wiggle, 0.1) == [0, 29]
    assert ph.zigzag_turning_points(np.array([10.0, 5.0, 20.0, 10.0]), 0.1) == [0, 1, 2, 3]


def test_smoothing_removes_single_spike() -> None:
    x = np.ones(9)
    x[4] = 5.0
    np.testing.assert_allclose(ph.smooth_over_checkpoints(x, 3), np.ones(9))
    with pytest.raises(ValueError):
        ph.smooth_over_checkpoints(x, 2)


def test_infer_warmup_steps() -> None:
    lr = np.minimum(np.arange(1, 301) / 100, 1.0) * np.linspace(1.0, 0.5, 300)
    metrics = pd.DataFrame(dict(step=np.arange(1, 301), lr=lr))
    assert ph.infer_warmup_steps(metrics) == 100
    assert ph.infer_warmup_steps(pd.DataFrame(dict(step=[1, 2], lr=[1.0, 1.0]))) == 0
    assert ph.infer_warmup_steps(None) == 0


def test_detect_write_and_format(tmp_path) -> None:
    results = pd.concat([long_table(trajectory(THREE_PHASES), layer=2),
                         long_table(trajectory(NO_COMPRESSION), layer=1)], ignore_index=True)
    table = ph.detect_phases(results, warmup_steps=WARMUP_STEPS)
    assert list(table.columns) == list(ph.PHASE_COLUMNS)
    assert labelled(table[table["layer"] == 2]) == [ph.WARMUP, ph.ENTROPY_SEEKING, ph.COMPRESSION_SEEKING]
    assert labelled(table[table["layer"] == 1]) == [ph.WARMUP, ph.ENTROPY_SEEKING]
    assert set(ph.detect_phases(results, layer=1, warmup_steps=WARMUP_STEPS)["layer"]) == {1}
    path = ph.write_phases(table, tmp_path)
    assert path == tmp_path / "probes" / "phases.csv"
    pd.testing.assert_frame_equal(pd.read_csv(path), table, check_dtype=False)
    text = ph.format_phases(table)
    assert "compression-seeking" in text and "layer 2" in text


def test_refinement_finds_the_raw_minimum() -> None:
    # The running median ties the minimum with its lower neighbour; the raw series breaks the tie.
    raw = np.array([30.0, 20.0, 14.0, 13.0, 10.0, 13.5, 20.0, 30.0])
    smoothed = ph.smooth_over_checkpoints(raw, 3)
    pivots = ph.zigzag_turning_points(smoothed, 0.1)
    assert ph.refine_turning_points(raw, smoothed, pivots, 3) == [0, 4, 7]
