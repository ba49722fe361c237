"""Geometry across a lineage of stages (pretrain -> sft -> dpo -> rlvr): one table, one axis, a summary.

A fine-tuning run records its parent checkpoint in every checkpoint's metadata, so a lineage is
found from its last workdir (:func:`lineage_workdirs`). Every stage is probed on the lineage
root's probe sequences; :func:`lineage_results` checks that their sha256 is one and the same and
concatenates the stages' results tables in lineage order, rows keyed ``(run, stage, step)`` with
cumulative ``tokens_seen``. Trajectories are never averaged across stages or runs.

:func:`stage_summary` gives RankMe and alpha-ReQ at each stage's first and last checkpoint and
their change (``probes/stages.csv``); :func:`make_lifecycle_figure` draws the stages on one
cumulative-token axis, each stage on its own log scale (so a short fine-tuning stage is as
readable as pretraining), shaded by stage, with each stage's phases marked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from entropy_jax.analysis import phases as ph
from entropy_jax.analysis.plots import save_figure
from entropy_jax.analysis.results import default_probe, load_optional, load_results, load_train_metrics, write_csv
from entropy_jax.checkpoint import read_meta, saved_steps
from entropy_jax.errors import UserError
from entropy_jax.train.task_eval import METRICS as EVAL_METRICS
from entropy_jax.workdir import Workdir

STAGE_COLOURS = {"pretrain": "0.85", "finetune": "tab:olive", "sft": "tab:blue", "dpo": "tab:green",
                 "rlvr": "tab:red"}
SUMMARY_COLUMNS = ("run", "stage", "probe", "layer", "start_step", "end_step", "start_tokens", "end_tokens",
                   "rankme_start", "rankme_end", "rankme_change", "alpha_start", "alpha_end", "alpha_change")


def _latest_meta(workdir: Path) -> dict | None:
    steps = saved_steps(workdir)
    return read_meta(workdir, steps[-1]) if steps else None


def lineage_workdirs(workdir: str | Path) -> list[Path]:
    """The workdirs of ``workdir``'s lineage, root first, following each run's recorded parent."""
    chain, current = [], Path(workdir).absolute()
    while current is not None:
        if current in chain:
            raise UserError(f"the lineage of {workdir} loops back to {current}")
        meta = _latest_meta(current)
        if meta is None:
            raise UserError(f"no checkpoints in {Workdir(current).checkpoints}: a stage of the lineage of {workdir} is "
                            "missing (moved or deleted?)")
        chain.append(current)
        parent = meta.get("parent")
        current = Path(parent["workdir"]) if parent else None
    return chain[::-1]


def _is_parent(parent: Path, child: Path) -> bool:
    """Whether ``child``'s latest checkpoint records ``parent`` as its parent run (by folder, or by
    run id where the folder was moved)."""
    link = (_latest_meta(child) or {}).get("parent")
    if not link:
        return False
    return Path(link["workdir"]).resolve() == parent.resolve() or link.get("run_id") == Workdir(parent).run_id()


def given_lineage(workdirs: list[str | Path]) -> bool:
    """Whether ``workdirs`` are one lineage in order, each the parent of the next: True; False when
    no one of them is the parent of another (independent runs); UserError naming the missing link
    when some are linked but not in one chain in the order given."""
    paths = [Path(w).absolute() for w in workdirs]
    if len(paths) < 2:
        return False
    links = [_is_parent(a, b) for a, b in zip(paths, paths[1:], strict=False)]
    if all(links):
        return True
    if not any(_is_parent(a, b) for a in paths for b in paths if a != b):
        return False
    i = links.index(False)
    parent = (_latest_meta(paths[i + 1]) or {}).get("parent")
    recorded = f"its parent is {parent['workdir']}" if parent else "it records no parent: a run from scratch"
    raise UserError(f"the workdirs are linked but not one lineage in the order given: {paths[i + 1]} does not start "
                    f"from {paths[i]} ({recorded}); give the stages root first, each the parent of the next")


def probe_set_hash(workdir: Path) -> str:
    path = Workdir(workdir).probe_set
    if not path.exists():
        raise UserError(f"no probe set at {path}: run experiments/probe.py --workdir={workdir} first")
    with np.load(path) as saved:
        return str(saved["sha256"])


def lineage_results(workdirs: list[str | Path]) -> tuple[pd.DataFrame, str]:
    """The results tables of ``workdirs`` (lineage order) as one table, and their one probe-set sha256.

    Raises UserError when the stages were probed on different probe sets (their numbers would not
    be comparable) or a table is missing.
    """
    hashes = {str(Path(w)): probe_set_hash(Path(w)) for w in workdirs}
    if len(set(hashes.values())) != 1:
        raise UserError("the stages were probed on different probe sets, so their numbers are not comparable: "
                        + "; ".join(f"{w}: {h[:12]}" for w, h in hashes.items()))
    tables = [load_results(w).assign(stage_index=i) for i, w in enumerate(workdirs)]
    table = pd.concat(tables, ignore_index=True)
    table = table.sort_values(["stage_index", "step"], kind="stable").reset_index(drop=True)
    return table, next(iter(hashes.values()))


def stage_evaluations(workdirs: list[str | Path]) -> list[pd.DataFrame]:
    """Per stage (lineage order) its held-out task metrics by checkpoint (``step``, ``tokens_seen`` and
    the :data:`~entropy_jax.train.task_eval.METRICS` it logs), from metrics.jsonl; empty for stages
    without them (pretraining)."""
    out = []
    for w in workdirs:
        log = load_optional(load_train_metrics, w, "the held-out task metrics")
        columns = [m for m in EVAL_METRICS if log is not None and m in log.columns]
        rows = log[["step", "tokens_seen", *columns]].dropna(subset=columns, how="all") if columns else None
        out.append(rows if rows is not None else pd.DataFrame(columns=["step", "tokens_seen"]))
    return out


def _evaluation_change(evaluations: pd.DataFrame) -> dict[str, float]:
    """``<metric>_start`` and ``<metric>_end``: each held-out metric at the stage's first and last checkpoint."""
    out = {}
    for metric in EVAL_METRICS:
        if metric in evaluations.columns and evaluations[metric].notna().any():
            values = evaluations.sort_values("step")[metric].dropna()
            out |= {f"{metric}_start": float(values.iloc[0]), f"{metric}_end": float(values.iloc[-1])}
    return out


def stage_summary(table: pd.DataFrame, *, probe: str, layers: list[int] | None = None,
                  evaluations: list[pd.DataFrame] | None = None) -> pd.DataFrame:
    """RankMe and alpha-ReQ at the first and last checkpoint of each stage (per layer), with the changes
    (RankMe relative, ``end / start - 1``; alpha absolute); with ``evaluations`` (:func:`stage_evaluations`),
    also each stage's held-out task metrics at its first and last checkpoint."""
    rankme_metric = ph.pick_rankme_metric(table)
    rows = table[(table["probe"] == probe) & (table["head"] == -1)
                 & table["metric"].isin([rankme_metric, "alpha_req"])]
    if layers is not None:
        rows = rows[rows["layer"].isin(layers)]
    out, extra = [], set()
    for (index, run, stage, layer), group in rows.groupby(["stage_index", "run", "stage", "layer"], sort=True):
        wide = group.pivot_table(index=["step", "tokens_seen"], columns="metric", values="value").reset_index()
        # a metric that is NaN throughout (constant representations: no spectrum to fit) leaves no column
        wide = wide.reindex(columns=["step", "tokens_seen", rankme_metric, "alpha_req"]).sort_values("step").dropna()
        if wide.empty:
            continue
        first, last = wide.iloc[0], wide.iloc[-1]
        out.append(dict(
            run=run, stage=stage, probe=probe, layer=int(layer), start_step=int(first["step"]),
            end_step=int(last["step"]), start_tokens=int(first["tokens_seen"]), end_tokens=int(last["tokens_seen"]),
            rankme_start=first[rankme_metric], rankme_end=last[rankme_metric],
            rankme_change=last[rankme_metric] / first[rankme_metric] - 1.0,
            alpha_start=first["alpha_req"], alpha_end=last["alpha_req"],
            alpha_change=last["alpha_req"] - first["alpha_req"],
        ))
        if evaluations is not None:
            out[-1] |= _evaluation_change(evaluations[int(index)])
            extra |= set(out[-1]) - set(SUMMARY_COLUMNS)
    order = [f"{m}_{end}" for m in EVAL_METRICS for end in ("start", "end")]
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS) + [c for c in order if c in extra])


def write_stage_summary(summary: pd.DataFrame, workdir: str | Path) -> Path:
    return write_csv(summary, Workdir(workdir).stages)


def format_stage_summary(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "no stage has both RankMe and alpha-ReQ rows"
    geometry = [c for c in SUMMARY_COLUMNS if c != "run"]
    text = summary[geometry].to_string(
        index=False, float_format=lambda v: f"{v:.3g}",
        formatters={"rankme_change": lambda v: f"{v:+.1%}", "alpha_change": lambda v: f"{v:+.3f}"})
    evaluated = [c for c in summary.columns if c not in SUMMARY_COLUMNS]
    if not evaluated:
        return text
    tasks = summary[["stage", *evaluated]].drop_duplicates("stage").dropna(subset=evaluated, how="all")
    return text + "\nheld-out task metrics (first -> last checkpoint of each stage):\n" + tasks.to_string(
        index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


def _stage_bounds(table: pd.DataFrame) -> list[tuple[str, int, int, int]]:
    """(stage, first tokens, last tokens, smallest gap between its checkpoints) per stage, in lineage order."""
    bounds = []
    for (_, stage), group in table.groupby(["stage_index", "stage"], sort=True):
        tokens = np.unique(group["tokens_seen"].to_numpy())
        gaps = np.diff(tokens)
        bounds.append((stage, int(tokens[0]), int(tokens[-1]), int(gaps.min()) if len(gaps) else 1))
    return bounds


def stage_position(bounds: list[tuple[str, int, int, int]], i: int, tokens) -> np.ndarray:
    """Cumulative tokens of stage ``i`` -> axis position: the stage fills [i, i + 1) with
    ``log(1 + (tokens - start) / gap)``, ``gap`` its first checkpoint spacing (a symlog per stage:
    its first step is as visible as the rest). A stage of one checkpoint (a published stage
    imported without its token count) sits at i, so stages at equal tokens stay apart."""
    _, lo, hi, gap = bounds[i]
    span = np.log1p(max(hi - lo, 1) / gap)
    return i + np.log1p((np.asarray(tokens, dtype=float) - lo) / gap) / span * 0.999


def _shade_stages(ax: Axes, bounds: list[tuple[str, int, int, int]]) -> list[Patch]:
    handles = {}
    for i, (stage, _, _, _) in enumerate(bounds):
        colour = STAGE_COLOURS.get(stage, "tab:gray")
        ax.axvspan(i, i + 1, color=colour, alpha=0.12, lw=0)
        handles[stage] = Patch(color=colour, alpha=0.3, label=f"stage {stage}")
    return list(handles.values())


def _mark_phases(ax: Axes, phase_table: pd.DataFrame | None, bounds: list, index: dict) -> list[Patch]:
    """Each stage's labelled phases as bars along the bottom of ``ax`` (``index``: (run, stage) -> stage)."""
    if phase_table is None or phase_table.empty:
        return []
    drawn = {}
    for row in phase_table.itertuples():
        colour = {ph.WARMUP: "tab:orange", ph.ENTROPY_SEEKING: "tab:green",
                  ph.COMPRESSION_SEEKING: "tab:purple"}.get(row.phase)
        i = index.get((row.run, row.stage))
        if colour is not None and i is not None:
            ax.axvspan(*stage_position(bounds, i, [row.start_tokens, row.end_tokens]), ymin=0.0, ymax=0.05,
                       color=colour, lw=0)
            drawn[row.phase] = Patch(color=colour, label=f"phase {row.phase}")
    return list(drawn.values())


EVAL_LABELS = {"eval_accuracy": "held-out accuracy", "eval_accuracy_ood": "held-out accuracy, OOD",
               "eval_reward_accuracy": "held-out DPO reward accuracy", "pass_at_k": "held-out pass@k (RLVR)"}


def _plot_evaluations(ax: Axes, evaluations: list[pd.DataFrame], bounds: list) -> None:
    """The stages' held-out task metrics (shares of prompts, 0 to 1) against cumulative tokens."""
    for i, metric in enumerate(EVAL_LABELS):
        label = EVAL_LABELS[metric]
        for stage, rows in enumerate(evaluations):
            if metric in rows.columns and stage < len(bounds):
                curve = rows[["tokens_seen", metric]].dropna()
                ax.plot(stage_position(bounds, stage, curve["tokens_seen"]), curve[metric], "s-", ms=3,
                        color=f"C{i}", label=label)
                label = None  # one legend entry per metric
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("share of held-out prompts")
    ax.legend(loc="best", fontsize="small")


def make_lifecycle_figure(table: pd.DataFrame, phase_table: pd.DataFrame | None = None, *, probe: str,
                          layer: int, evaluations: list[pd.DataFrame] | None = None) -> Figure:
    """RankMe and alpha-ReQ of one (probe, layer) over every stage against cumulative tokens; with
    ``evaluations`` (:func:`stage_evaluations`) holding any held-out task metric, a panel of them below."""
    rankme_metric = ph.pick_rankme_metric(table)
    rows = table[(table["probe"] == probe) & (table["layer"] == layer) & (table["head"] == -1)]
    bounds = _stage_bounds(rows)
    if not bounds:
        raise ValueError(f"no rows for probe {probe!r} at layer {layer}")
    if phase_table is not None and not phase_table.empty:
        phase_table = phase_table[(phase_table["probe"] == probe) & (phase_table["layer"] == layer)]
    index = {k: i for i, k in enumerate(rows.groupby(["stage_index"], sort=True).first()
                                       .set_index(["run", "stage"]).index)}
    stage_of = {si: i for i, si in enumerate(sorted(rows["stage_index"].unique()))}
    # the evaluations of the stages this probe has rows in (the task view: fine-tuning stages only)
    tasks = [evaluations[si] for si in stage_of if si < len(evaluations)] if evaluations else []
    tasks = tasks if any(len(e) for e in tasks) else []
    fig = Figure(figsize=(10, 9 if tasks else 6.5), layout="constrained")
    ax_r, ax_a, *ax_e = fig.subplots(3 if tasks else 2, 1, sharex=True)
    for ax, metric, colour, label in ((ax_r, rankme_metric, "tab:blue", f"RankMe, {rankme_metric} (effective rank)"),
                                      (ax_a, "alpha_req", "tab:red", "alpha-ReQ (power-law exponent)")):
        for stage_index, group in rows[rows["metric"] == metric].groupby("stage_index", sort=True):  # never joined
            group = group.sort_values("step")
            ax.plot(stage_position(bounds, stage_of[stage_index], group["tokens_seen"]), group["value"], "o-", ms=3,
                    color=colour)
        ax.set_ylabel(label)
    handles = _shade_stages(ax_r, bounds) + _mark_phases(ax_r, phase_table, bounds, index)
    _shade_stages(ax_a, bounds)
    _mark_phases(ax_a, phase_table, bounds, index)
    for ax in ax_e:
        _plot_evaluations(ax, tasks, bounds)
        _shade_stages(ax, bounds)
    ticks = [(i, lo) for i, (_, lo, _, _) in enumerate(bounds)] + [(len(bounds) - 0.001, bounds[-1][2])]
    bottom = ax_e[-1] if ax_e else ax_a
    bottom.set_xlim(0, len(bounds))
    bottom.set_xticks([u for u, _ in ticks], [f"{t / 1e6:.3g}M" if t >= 1e6 else f"{t:,}" for _, t in ticks])
    bottom.set_xlabel("cumulative tokens seen at each stage's start (each stage on its own log scale)")
    ax_r.legend(handles=handles, loc="best", fontsize="small")
    ax_r.set_title(f"Representation geometry across stages: probe {probe}, layer {layer}")
    return fig


@dataclasses.dataclass(frozen=True)
class LifecycleReport:
    workdirs: list[Path]
    probe_set_sha256: str
    summary: pd.DataFrame
    summary_path: Path
    plots: list[Path]

    def __str__(self) -> str:
        stages = " -> ".join(f"{w.name}" for w in self.workdirs)
        pngs = "\n".join(f"  {p}" for p in self.plots)
        return (f"lifecycle: {stages} (probe set sha256 {self.probe_set_sha256[:12]})\n"
                f"stage summary: {self.summary_path}\n{format_stage_summary(self.summary)}\nplots:\n{pngs}")


def summary_layers(table: pd.DataFrame, probe: str) -> list[int]:
    """The final layer (after the final norm) and a middle one of ``probe``, among the layers with a
    finite alpha-ReQ (a layer of constant representations has no spectrum to draw)."""
    rows = table[(table["probe"] == probe) & (table["metric"] == "alpha_req") & np.isfinite(table["value"])]
    layers = sorted(int(x) for x in rows["layer"].unique() if x >= 0)
    return sorted({layers[(len(layers) - 1) // 2], layers[-1]})


def task_view_probes(workdirs: list[Path]) -> list[str]:
    """The representation probes of the lineage's stages that read held-out task prompts
    (``inputs="task_prompts"``: the second probe view of fine-tuning stages), from their configs."""
    names = set()
    for w in workdirs:
        probes = ((_latest_meta(w) or {}).get("config") or {}).get("probes") or {}
        names |= {n for n, e in probes.items() if isinstance(e, dict) and e.get("inputs") == "task_prompts"}
    return sorted(names)


def analyse_lineage(workdir: str | Path, *, probe: str | None = None,
                    stages: list[str | Path] | None = None) -> LifecycleReport:
    """Stage summary (``probes/stages.csv``) and lifecycle plots (``plots/lifecycle_*.png``) of the lineage
    ending at ``workdir``, written into ``workdir``; every stage must have been probed. ``stages``: the
    workdirs to draw, root first, ending at ``workdir`` (default: the whole recorded lineage). Beside
    ``probe`` (default :func:`default_probe`), the task-prompt view of the fine-tuning stages
    (:func:`task_view_probes`) gets its rows in the summary and its figures."""
    workdirs = [Path(w).absolute() for w in stages] if stages else lineage_workdirs(workdir)
    table, digest = lineage_results(workdirs)
    probe = probe or default_probe(table)
    evaluations = stage_evaluations(workdirs)
    summaries, paths, out = [], [], Workdir(workdir).plots
    for view in [probe, *(p for p in task_view_probes(workdirs) if p != probe and p in set(table["probe"]))]:
        layers = summary_layers(table, view)
        phase_tables = []
        for w in workdirs:
            train_metrics = load_optional(load_train_metrics, w, "warmup inference")
            phase_tables.append(ph.detect_phases(load_results(w), train_metrics=train_metrics, probe=view))
        phase_table = pd.concat(phase_tables, ignore_index=True)
        summaries.append(stage_summary(table, probe=view, layers=layers, evaluations=evaluations))
        paths += [save_figure(make_lifecycle_figure(table, phase_table, probe=view, layer=layer,
                                                    evaluations=evaluations),
                              out / f"lifecycle_{view}_layer{layer}.png") for layer in layers]
    summary = pd.concat(summaries, ignore_index=True)
    return LifecycleReport(workdirs, digest, summary, write_stage_summary(summary, workdir), paths)
