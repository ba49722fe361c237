r"""Import published Hugging Face checkpoints (Pythia/GPT-NeoX, GPT-2, Llama, OLMo-2, Qwen2, Mistral) as the
checkpoints of a workdir.

  python experiments/import_hf.py --hf_dir=/data/pythia-160m/step0 --hf_dir=/data/pythia-160m/step1000 \
      --workdir=runs/pythia160m --text_dir=/data/wikitext
  python experiments/import_hf.py --hf_dir=~/.cache/huggingface/hub/models--EleutherAI--pythia-160m \
      --workdir=runs/pythia160m --text_dir=/data/wikitext          # an existing Hub cache tree, offline
  python experiments/import_hf.py --hf_model=EleutherAI/pythia-160m --revisions=0,1,2,4,1000,143000 \
      --workdir=runs/pythia160m --text_dir=/data/wikitext          # network: download, import, free each
  python experiments/probe.py --workdir=runs/pythia160m
  python experiments/plot.py --workdir=runs/pythia160m
  python experiments/import_hf.py --hf_dir=/data/OLMo-2-1124-7B-SFT --stage=sft --parent=runs/olmo2 \
      --workdir=runs/olmo2_sft                                   # a published stage under its parent

Each revision becomes one Orbax checkpoint (stage ``pretrain``, the step parsed from the revision
name, tokens seen = step x --tokens_per_step, or the tokens the name states (OLMo-2's
``stage1-step140000-tokens588B``), or for GPT-NeoX only Pythia's 2,097,152 a step; metadata with
repo, revision, commit and the sha256 of every weight file; see entropy_jax.models.hf.record), so
the sweep, table, phases and plots work unchanged. With ``--stage=<name> --parent=<workdir>`` the
revisions are a stage under the parent's latest checkpoint, with the lineage metadata of a native
fine-tuning run: the parent recorded, tokens continuing from the parent's, probed on the lineage
root's sequences (no --text_dir); a revision without a step in its name (``main``) is step 0.
The probe set is the model's own tokenizer over --text_dir (or a prepared TFDS text
set, --tfds_name): the first --num_sequences paragraphs of at least --seq_len tokens, cropped.
Revisions already in the workdir are skipped; two revisions with identical parameters are logged
and recorded (``duplicate_of``). ``--weights_only`` writes the weight-matrix statistics straight
from the files (no model built) to ``<workdir>/probes/weights_from_files.csv``.

Every local revision is checked (config, tensor names and shapes) before anything is written.
Exit status: 0 done; 2 bad input (one line "error: ..."), nothing written; 1 a bug.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import jax
import pandas as pd
from absl import app, flags

from entropy_jax.checkpoint import Checkpoints, content_hash, read_meta, saved_steps
from entropy_jax.cli import start, user_errors
from entropy_jax.config import InitFromConfig
from entropy_jax.errors import UserError
from entropy_jax.models import ModelConfig, hf
from entropy_jax.models.hf.revisions import Revision, download, hub_revisions, tokens_seen
from entropy_jax.probes import weight_spectra
from entropy_jax.sharding import make_mesh
from entropy_jax.train.loop import child_lineage
from entropy_jax.train.start import Parent, parent_checkpoint
from entropy_jax.workdir import Workdir

_HF_DIR = flags.DEFINE_multi_string("hf_dir", [], "A revision folder (config.json + safetensors), a folder of "
                                    "step* folders, or a Hugging Face cache tree (models--org--name). Repeatable.")
_HF_MODEL = flags.DEFINE_string("hf_model", "", "A Hub repository to download revisions from (needs network and "
                                "huggingface_hub: pip install 'entropy_jax[hf]').")
_REVISIONS = flags.DEFINE_list("revisions", [], "With --hf_model: steps (e.g. 0,1,2,4,1000) or branch names "
                               "(stage1-step140000-tokens588B; main) to download; empty: every step branch.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir the checkpoints are written to.", required=True)
_STEP = flags.DEFINE_integer("step", None, "The step of a single --hf_dir whose name is not step<N>.")
_TOKENS_PER_STEP = flags.DEFINE_integer("tokens_per_step", None, "Training tokens per step. Unset: the tokens "
                                        "a revision name states (OLMo-2), else Pythia's 1,024 x 2,048 for GPT-NeoX "
                                        "only; other families need it from step 1 on.")
_STAGE = flags.DEFINE_string("stage", "", "With --parent: the stage these revisions are (e.g. sft, dpo, rlvr).")
_PARENT = flags.DEFINE_string("parent", "", "A workdir whose latest checkpoint the imported stage starts from.")
_TEXT_DIR = flags.DEFINE_string("text_dir", "", "Folder of .txt/.md files for the probe set.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "", "A prepared TFDS text dataset for the probe set instead.")
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "validation", "Its split.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Probe sequence length in tokens (shorter documents dropped).")
_NUM_SEQUENCES = flags.DEFINE_integer("num_sequences", 1024, "Probe sequences (>= 10 x d_model for the spectra).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Probe forward batch (global).")
_FSDP = flags.DEFINE_bool("fsdp", False, "Shard parameters over the data axis while importing (large models).")
_WEIGHTS_ONLY = flags.DEFINE_bool("weights_only", False, "Only the weight statistics, straight from the files.")


def check_import_workdir(workdir: str | Path) -> None:
    """Refuse a workdir whose checkpoints were not imported (a native training run's): an import
    would take its steps for revisions and write its probe set into that run."""
    wd = Workdir(workdir)
    steps = saved_steps(wd.root)
    if not steps:
        return
    with Checkpoints(wd.root, read_only=True) as ckpts:
        meta = ckpts.read_meta(steps[0])
    if "source" not in meta:
        raise hf.HFImportError(f"--workdir={wd.root} holds the checkpoints of a native {meta.get('stage', 'training')} "
                               f"run (run {meta.get('run_id', wd.name)}, steps {steps[0]}..{steps[-1]}), not imported "
                               "revisions; import into a new --workdir")


class Importer:
    """Writes imported revisions into one workdir, checking they share one model config."""

    def __init__(self, workdir: str | Path, source: dict, probes: dict, tokens_per_step: int | None,
                 fsdp: bool = False, parent: Parent | None = None, stage: str = ""):
        self.wd, self.source, self.probes = Workdir(workdir), source, probes
        self.tokens_per_step, self.fsdp = tokens_per_step, fsdp
        self.parent, self.stage = parent, stage
        self.ckpts = Checkpoints(self.wd.root)
        self.known: dict[str, int] = {}  # params sha256 -> first step holding them
        self.model_config: dict | None = None
        for step in self.ckpts.all_steps():
            meta = self.ckpts.read_meta(step)
            self.known.setdefault(meta.get("params_sha256", ""), step)
            self.model_config = meta["model_config"]

    def add(self, rev: Revision) -> bool:
        """Import one revision; False when its step is already in the workdir."""
        if rev.step in self.ckpts.all_steps():
            logging.info("step %d (%s) is already in %s: skipped", rev.step, rev.name, self.ckpts.directory)
            return False
        ckpt = hf.read_hf_checkpoint(rev.folder, make_mesh(), self.fsdp)
        mcfg = dataclasses.asdict(ckpt.model_config)
        if self.model_config is not None and self.model_config != mcfg:
            raise hf.HFImportError(f"{rev.folder} is another model than the workdir's checkpoints "
                                   f"({self.wd.root}); import each model into its own workdir")
        self.model_config = mcfg
        sha = content_hash(ckpt.params)
        duplicate_of = self.known.get(sha)
        if duplicate_of is not None:
            logging.warning("revision %s (step %d) has exactly the parameters of step %d (sha256 %s): the "
                            "published branch serves duplicated weights", rev.name, rev.step, duplicate_of, sha[:16])
        self.known.setdefault(sha, rev.step)
        run_id = self.wd.run_id(create=jax.process_index() == 0)
        tokens, per_step = tokens_seen(rev, ckpt.model_type, self.tokens_per_step)
        lineage = None
        if self.parent is not None:
            lineage = dataclasses.asdict(child_lineage(self.parent, run_id, self.stage))
        meta = hf.revision_meta(ckpt, rev, run_id=run_id, tokens_per_step=per_step, source=self.source,
                                probes=self.probes, sha256=sha, duplicate_of=duplicate_of, tokens=tokens,
                                lineage=lineage)
        self.ckpts.save(rev.step, arrays={"params": ckpt.params, "model_state": ckpt.model_state},
                        json={"meta": meta})
        logging.info("imported %s as step %d (%d tokens) into %s", rev.folder, rev.step, meta["tokens_seen"],
                     self.ckpts.directory)
        return True

    def close(self) -> None:
        self.ckpts.close()


def probe_source_for(workdir: Path, tokenizer: Path, text_dir: str = "", tfds_name: str = "", tfds_split: str = "",
                     seq_len: int = 128, num_sequences: int = 1024, batch_size: int = 32) -> dict:
    """The hf_text probe source, checked now (tokenizer present, enough text) so nothing is written
    for a probe set that cannot be built; the workdir keeps its own copy of the tokenizer."""
    if not tokenizer.exists():
        raise hf.HFImportError(f"{tokenizer.parent} has no tokenizer.json; the probe set needs the model's tokenizer")
    kept = Workdir(workdir).tokenizer
    source = hf.probe_source(kept, seq_len, num_sequences, batch_size, text_dir, tfds_name, tfds_split)
    if text_dir or tfds_name:
        hf.probe_tokens({**source, "tokenizer": str(tokenizer)})
    return source


def keep_tokenizer(tokenizer: Path, source: dict) -> None:
    kept = Path(source["tokenizer"])
    if not kept.exists():
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, kept)


def stage_parent(parent: str | Path, stage: str, workdir: str | Path, text_dir: str = "", tfds_name: str = "",
                 **_sizes) -> Parent:
    """The checkpoint an imported stage starts from (``parent``'s latest), checked before anything is
    written: a stage name, another workdir, no probe text of its own (the root's sequences are probed)."""
    if not stage or not parent:
        raise UserError("--parent and --stage go together: the workdir the stage starts from, and the stage's name "
                        "(e.g. sft, dpo, rlvr)")
    if text_dir or tfds_name:
        raise UserError("--text_dir / --tfds_name choose a root's probe set; a stage under --parent is probed on "
                        "its lineage root's sequences: drop them")
    wd, step = parent_checkpoint(InitFromConfig(workdir=str(parent)))
    if wd.root.absolute() == Workdir(workdir).root.absolute():
        raise UserError(f"--parent={parent} is --workdir itself; import the stage into a workdir of its own")
    return Parent(wd, step, read_meta(wd, step))


def check_stage_model(parent: Parent, cfg: ModelConfig) -> None:
    """An imported stage has its parent's model (its tokenizer may add tokens: vocab_padding may differ)."""
    ours, saved = dataclasses.asdict(cfg), parent.meta["model_config"]
    diffs = [k for k in sorted(ours) if k != "vocab_padding" and saved.get(k, ModelConfig.default(k)) != ours[k]]
    if diffs:
        differing = ", ".join(f"{k} {saved.get(k)!r} vs {ours[k]!r}" for k in diffs)
        raise hf.HFImportError(f"the revisions are another model than --parent={parent.workdir.root} step "
                               f"{parent.step} (differing: {differing}); a stage continues its parent's model")


def check_context(cfg: ModelConfig, seq_len: int) -> None:
    if seq_len > cfg.max_len:
        raise hf.HFImportError(f"--seq_len={seq_len} is longer than the model's context of {cfg.max_len} positions "
                               "(max_position_embeddings, or Mistral's sliding_window): give at most "
                               f"{cfg.max_len}")


def import_folders(folders: list[str], workdir: str | Path, step: int | None = None, fsdp: bool = False,
                   tokens_per_step: int | None = None, stage: str = "", parent: str | Path = "",
                   **probe_kwargs) -> list[int]:
    """Import local revision folders (or cache trees) into ``workdir``; returns the steps written.
    With ``parent`` (a workdir) and ``stage``, as a stage under the parent's latest checkpoint.
    All folders are checked before the first write."""
    check_import_workdir(workdir)
    parent_ckpt = stage_parent(parent, stage, workdir, **probe_kwargs) if parent or stage else None
    if parent_ckpt is not None and step is None and len(folders) == 1 and (Path(folders[0]) / "config.json").exists() \
            and not hf.revisions.is_revision_name(Path(folders[0]).name):
        step = 0  # a published stage's one revision (its main branch): the stage's start
    revisions = hf.find_revisions(folders, step)
    cfgs = {r.folder: hf.check_hf_folder(r.folder) for r in revisions}
    if len({str(c) for c in cfgs.values()}) > 1:
        raise hf.HFImportError(f"the folders hold {len(set(map(str, cfgs.values())))} different models; import each "
                               "into its own workdir")
    cfg, model_type = next(iter(cfgs.values())), hf.read_config(revisions[0].folder)["model_type"]
    for r in revisions:
        tokens_seen(r, model_type, tokens_per_step)
    tokenizer = revisions[0].folder / "tokenizer.json"
    if parent_ckpt is not None:
        check_stage_model(parent_ckpt, cfg)
        source = child_lineage(parent_ckpt, "", stage).probe_source
    else:
        source = probe_source_for(Path(workdir), tokenizer, **probe_kwargs)
    check_context(cfg, int(source["seq_len"]))
    importer = Importer(workdir, source, dict(hf.record.DEFAULT_PROBES), tokens_per_step, fsdp, parent_ckpt, stage)
    try:
        written = [r.step for r in revisions if importer.add(r)]
    finally:
        importer.close()
    if parent_ckpt is None:
        keep_tokenizer(tokenizer, source)
    return written


def import_hub(repo: str, revisions: list[int | str], workdir: str | Path, fsdp: bool = False,
               tokens_per_step: int | None = None, stage: str = "", parent: str | Path = "",
               **probe_kwargs) -> list[int]:
    """Download, import and delete one revision at a time. ``revisions``: steps (``step<N>``
    branches), branch names (OLMo-2's ``stage1-step140000-tokens588B``; ``main``, step 0, for a
    stage under ``parent``), or empty: every step branch."""
    check_import_workdir(workdir)
    parent_ckpt = stage_parent(parent, stage, workdir, **probe_kwargs) if parent or stage else None
    names = [f"step{r}" if str(r).isdigit() else str(r) for r in revisions] if revisions else hub_revisions(repo)
    importer, written = None, []
    try:
        for name in names:
            step = 0 if parent_ckpt is not None and not hf.revisions.is_revision_name(name) else None
            with download(repo, name, step) as rev:
                cfg = hf.check_hf_folder(rev.folder)
                tokens_seen(rev, hf.read_config(rev.folder)["model_type"], tokens_per_step)
                if importer is None:
                    if parent_ckpt is not None:
                        check_stage_model(parent_ckpt, cfg)
                        source = child_lineage(parent_ckpt, "", stage).probe_source
                    else:
                        source = probe_source_for(Path(workdir), rev.folder / "tokenizer.json", **probe_kwargs)
                    check_context(cfg, int(source["seq_len"]))
                    importer = Importer(workdir, source, dict(hf.record.DEFAULT_PROBES), tokens_per_step, fsdp,
                                        parent_ckpt, stage)
                    if parent_ckpt is None:
                        keep_tokenizer(rev.folder / "tokenizer.json", source)
                if importer.add(rev):
                    written.append(rev.step)
    finally:
        if importer is not None:
            importer.close()
    return written


def weights_from_files(folders: list[str], workdir: str | Path, step: int | None = None) -> Path:
    """Weight-matrix statistics of every revision straight from its files, as a tidy CSV."""
    rows = []
    for rev in hf.find_revisions(folders, step):
        for path, stats in weight_spectra(hf.weight_matrices(rev.folder)).items():
            rows += [{"step": rev.step, "revision": rev.name, "matrix": path, "metric": k, "value": stats[k]}
                     for k in ("spectral_norm", "frobenius_norm", "stable_rank", "condition_number")]
    out = Workdir(workdir).weights_from_files
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def main(argv: list[str]) -> None:
    start(argv)
    probe_kwargs = dict(text_dir=_TEXT_DIR.value, tfds_name=_TFDS_NAME.value, tfds_split=_TFDS_SPLIT.value,
                        seq_len=_SEQ_LEN.value, num_sequences=_NUM_SEQUENCES.value, batch_size=_BATCH_SIZE.value)
    with user_errors():
        if bool(_HF_DIR.value) == bool(_HF_MODEL.value):
            raise hf.HFImportError("give either --hf_dir (local folders) or --hf_model (a Hub repository)")
        if _WEIGHTS_ONLY.value:
            print(f"weight statistics: {weights_from_files(_HF_DIR.value, _WORKDIR.value, _STEP.value)}")
            return
        if _HF_MODEL.value:
            written = import_hub(_HF_MODEL.value, _REVISIONS.value, _WORKDIR.value, _FSDP.value,
                                 _TOKENS_PER_STEP.value, _STAGE.value, _PARENT.value, **probe_kwargs)
        else:
            written = import_folders(_HF_DIR.value, _WORKDIR.value, _STEP.value, _FSDP.value, _TOKENS_PER_STEP.value,
                                     _STAGE.value, _PARENT.value, **probe_kwargs)
    print(f"imported {len(written)} revisions (steps {written}) into {Workdir(_WORKDIR.value).checkpoints}")


if __name__ == "__main__":
    app.run(main)
