r"""Import published Hugging Face checkpoints (Pythia/GPT-NeoX, GPT-2) as the checkpoints of a workdir.

  python experiments/import_hf.py --hf_dir=/data/pythia-160m/step0 --hf_dir=/data/pythia-160m/step1000 \
      --workdir=runs/pythia160m --text_dir=/data/wikitext
  python experiments/import_hf.py --hf_dir=~/.cache/huggingface/hub/models--EleutherAI--pythia-160m \
      --workdir=runs/pythia160m --text_dir=/data/wikitext          # an existing Hub cache tree, offline
  python experiments/import_hf.py --hf_model=EleutherAI/pythia-160m --revisions=0,1,2,4,1000,143000 \
      --workdir=runs/pythia160m --text_dir=/data/wikitext          # network: download, import, free each
  python experiments/probe.py --workdir=runs/pythia160m
  python experiments/plot.py --workdir=runs/pythia160m

Each revision becomes one Orbax checkpoint (stage ``pretrain``, the step parsed from the revision
name, tokens seen = step x --tokens_per_step, metadata with repo, revision, commit and the sha256
of every weight file; see entropy_jax.models.hf.record), so the sweep, table, phases and plots work
unchanged. The probe set is the model's own tokenizer over --text_dir (or a prepared TFDS text
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

from entropy_jax.checkpoint import Checkpoints, content_hash, saved_steps
from entropy_jax.cli import start, user_errors
from entropy_jax.models import hf
from entropy_jax.models.hf.revisions import PYTHIA_TOKENS_PER_STEP, Revision, download, hub_revisions
from entropy_jax.probes import weight_spectra
from entropy_jax.sharding import make_mesh
from entropy_jax.workdir import Workdir

_HF_DIR = flags.DEFINE_multi_string("hf_dir", [], "A revision folder (config.json + safetensors), a folder of "
                                    "step* folders, or a Hugging Face cache tree (models--org--name). Repeatable.")
_HF_MODEL = flags.DEFINE_string("hf_model", "", "A Hub repository to download revisions from (needs network and "
                                "huggingface_hub: pip install 'entropy_jax[hf]').")
_REVISIONS = flags.DEFINE_list("revisions", [], "With --hf_model: steps to download (e.g. 0,1,2,4,1000); empty: "
                               "every step* branch of the repository.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir the checkpoints are written to.", required=True)
_STEP = flags.DEFINE_integer("step", None, "The step of a single --hf_dir whose name is not step<N>.")
_TOKENS_PER_STEP = flags.DEFINE_integer("tokens_per_step", PYTHIA_TOKENS_PER_STEP, "Training tokens per step "
                                        "(Pythia: 1,024 x 2,048).")
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

    def __init__(self, workdir: str | Path, source: dict, probes: dict, tokens_per_step: int, fsdp: bool = False):
        self.wd, self.source, self.probes = Workdir(workdir), source, probes
        self.tokens_per_step, self.fsdp = tokens_per_step, fsdp
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
        meta = hf.revision_meta(ckpt, rev, run_id=self.wd.run_id(create=jax.process_index() == 0),
                                tokens_per_step=self.tokens_per_step, source=self.source, probes=self.probes,
                                sha256=sha, duplicate_of=duplicate_of)
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


def import_folders(folders: list[str], workdir: str | Path, step: int | None = None, fsdp: bool = False,
                   tokens_per_step: int = PYTHIA_TOKENS_PER_STEP, **probe_kwargs) -> list[int]:
    """Import local revision folders (or cache trees) into ``workdir``; returns the steps written.
    All folders are checked before the first write."""
    check_import_workdir(workdir)
    revisions = hf.find_revisions(folders, step)
    configs = {str(hf.check_hf_folder(r.folder)) for r in revisions}
    if len(configs) > 1:
        raise hf.HFImportError(f"the folders hold {len(configs)} different models; import each into its own workdir")
    tokenizer = revisions[0].folder / "tokenizer.json"
    source = probe_source_for(Path(workdir), tokenizer, **probe_kwargs)
    importer = Importer(workdir, source, dict(hf.record.DEFAULT_PROBES), tokens_per_step, fsdp)
    try:
        written = [r.step for r in revisions if importer.add(r)]
    finally:
        importer.close()
    keep_tokenizer(tokenizer, source)
    return written


def import_hub(repo: str, steps: list[int], workdir: str | Path, fsdp: bool = False,
               tokens_per_step: int = PYTHIA_TOKENS_PER_STEP, **probe_kwargs) -> list[int]:
    """Download, import and delete one revision at a time (``steps`` empty: every step* branch)."""
    check_import_workdir(workdir)
    names = [f"step{s}" for s in steps] if steps else hub_revisions(repo)
    importer, written = None, []
    try:
        for name in names:
            with download(repo, name) as rev:
                hf.check_hf_folder(rev.folder)
                if importer is None:
                    source = probe_source_for(Path(workdir), rev.folder / "tokenizer.json", **probe_kwargs)
                    importer = Importer(workdir, source, dict(hf.record.DEFAULT_PROBES), tokens_per_step, fsdp)
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
            written = import_hub(_HF_MODEL.value, [int(s) for s in _REVISIONS.value], _WORKDIR.value, _FSDP.value,
                                 _TOKENS_PER_STEP.value, **probe_kwargs)
        else:
            written = import_folders(_HF_DIR.value, _WORKDIR.value, _STEP.value, _FSDP.value, _TOKENS_PER_STEP.value,
                                     **probe_kwargs)
    print(f"imported {len(written)} revisions (steps {written}) into {Workdir(_WORKDIR.value).checkpoints}")


if __name__ == "__main__":
    app.run(main)
