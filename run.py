"""The one-command demo: pretrain, fine-tune (SFT, DPO, RLVR), probe every checkpoint, find phases, plot.

  python run.py                              # the whole lifecycle on the tiny preset
  python run.py --stages=pretrain            # pretraining only (the embedded associative-pairs corpus)
  python run.py --workdir=/tmp/run1 --config=experiments/configs/pretrain.py:small --config.train.steps=20000 \
      --stages=pretrain

Pretraining writes --workdir; each fine-tuning stage starts from the previous stage's last
checkpoint and writes ``<workdir>-<stage>`` (configs experiments/configs/{sft,dpo,rlvr}.py, preset
--stage_preset, which must match the pretraining preset's model). The last stage's workdir then
holds the lifecycle: ``probes/stages.csv`` (RankMe and alpha at each stage's start and end) and
``plots/lifecycle_*.png`` (all stages on one cumulative-token axis).

Every stage resumes: rerunning the same command continues training from the latest
checkpoint, probes only checkpoints without results, and redraws the plots. The stages can
also be run alone: experiments/pretrain.py, experiments/probe.py, experiments/plot.py.

The whole configuration is checked before anything is written. Exit status: 0 done; 2 bad input
(one line "error: ..."; nothing written), including a full disk or a read-only workdir; 3 done,
but some checkpoints could not be read and were skipped by the probe sweep; 1 an unexpected error
(a bug, with its traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags, logging

from entropy_jax import analysis, cli
from entropy_jax.analysis.lifecycle import analyse_lineage
from entropy_jax.cli import start, summarise_training, train_with_probes, user_errors
from entropy_jax.errors import UserError
from entropy_jax.sharding import is_writer
from entropy_jax.sweep import sweep
from entropy_jax.train.reference import prepare_stage
from entropy_jax.workdir import Workdir

CONFIGS = Path(__file__).parent / "experiments" / "configs"
POST_STAGES = ("sft", "dpo", "rlvr")
POST_PRESETS = ("tiny", "small", "test")
cli.define_config_flag(
    str(CONFIGS / "pretrain.py") + ":tiny",
    "Config file and preset (default: the tiny demo); keys overridable as --config.train.steps=N.",
)
flags.DEFINE_string("workdir", "runs/demo", "Output folder (checkpoints, metrics.jsonl, probes/, plots/).")
flags.DEFINE_list("stages", ["pretrain", *POST_STAGES], "Stages to run in order: pretrain, then any of "
                  f"{', '.join(POST_STAGES)} (each starts from the one before).")
flags.DEFINE_string("stage_preset", "auto", "Preset of the fine-tuning configs (tiny, small, test); auto: the "
                    "one whose model, vocabulary and sequence length are the pretraining config's "
                    "(none: pretrain only).")


def matching_preset(cfg) -> str | None:
    """The fine-tuning preset built on the same model, vocabulary and sequence length as ``cfg``."""
    for preset in POST_PRESETS:
        c = cli.load_config_file(f"{CONFIGS / 'sft.py'}:{preset}")
        if (c.model.to_dict(), c.data.vocab_size, c.train.seq_len) == (
                cfg.model.to_dict(), cfg.data.get("vocab_size"), cfg.train.seq_len):
            return preset
    return None


def run_stages(pretrain_cfg, workdir: Workdir, stages: list[str], preset: str) -> tuple[list[Workdir], list]:
    """Train and probe each stage; returns the workdirs and training results in lineage order."""
    if not stages or stages[0] != "pretrain" or any(s not in POST_STAGES for s in stages[1:]) \
            or len(set(stages)) != len(stages):
        raise UserError(f"--stages={','.join(stages)}: give pretrain, then any of {', '.join(POST_STAGES)} in order")
    if preset == "auto" and len(stages) > 1:
        preset = matching_preset(pretrain_cfg)
        if preset is None:
            logging.warning("no fine-tuning preset (%s) fits this model: running pretrain only; give "
                            "--stage_preset to choose one", ", ".join(POST_PRESETS))
            stages = stages[:1]
    workdirs, results, cfg = [workdir], [train_with_probes(pretrain_cfg, workdir)], pretrain_cfg
    for stage in stages[1:]:
        parent = workdirs[-1]
        stage_cfg = cli.load_config_file(f"{CONFIGS / stage}.py:{preset}")
        stage_cfg.data.data_dir = cfg.data.data_dir
        stage_cfg.seed = pretrain_cfg.seed  # --config.seed=N gives the whole lifecycle seed N
        stage_cfg.init_from.workdir = str(parent.root)
        stage_dir = Workdir.from_flag(f"{workdir.root}-{stage}")
        prepare_stage(stage_cfg, stage_dir)
        results.append(train_with_probes(stage_cfg, stage_dir))
        workdirs.append(stage_dir)
    return workdirs, results


def main(argv: list[str]) -> None:
    start(argv)
    with user_errors():
        workdir = Workdir.from_flag(flags.FLAGS.workdir)
        logging.info("workdir: %s", workdir.root)
        workdirs, results = run_stages(flags.FLAGS.config, workdir, flags.FLAGS.stages, flags.FLAGS.stage_preset)
        reports = [sweep(w) for w in workdirs]
        if not is_writer():
            return
        analysis.check_plot_request(str(workdir.root), None, None)
        analysis_report = analysis.analyse(workdir)
        lifecycle = analyse_lineage(workdirs[-1]) if len(workdirs) > 1 else None
    for result in results:
        print("\n" + summarise_training(result))
    for report in reports:
        print(f"probe results: {report.results_path} ({report.rows_added} rows added this run)")
    print(analysis_report, flush=True)
    if lifecycle is not None:
        print(lifecycle, flush=True)
    skipped = [s for r in reports for s, _ in r.skipped]
    if skipped:
        print(f"skipped unreadable checkpoints: {skipped}", file=sys.stderr)
        sys.exit(cli.EXIT_SKIPPED)


if __name__ == "__main__":
    cli.run(main)
