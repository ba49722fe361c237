"""Revisions of a published model: their names, local folders, the Hugging Face cache tree, downloads.

Pythia publishes 154 revisions per model as branches ``step0``, ``step1``, ``step2``, ``step4`` ...
``step512``, ``step1000``, then every 1000 to ``step143000`` (2,097,152 tokens per step: 1,024
sequences of 2,048 tokens). OLMo-2 names its revisions with the training stage and the tokens
seen, ``stage1-step140000-tokens588B`` or ``stage2-ingredient1-step11931-tokens100B``: the step
and the tokens are read from the name (:func:`revision_step`, :func:`revision_tokens`; the token
count is as rounded in the name). Pythia's tokens per step apply to GPT-NeoX models only
(:func:`tokens_seen`). A revision is found three ways:

* a plain folder (``config.json`` + safetensors) named like its revision (``.../step1000``), or a
  folder of such folders;
* a Hugging Face cache tree (``models--<org>--<name>/{refs/<revision>, snapshots/<commit>/}``),
  read in place (the files there are symlinks into ``blobs/``);
* with network and the optional ``huggingface_hub``: downloaded one revision at a time into a
  temporary folder that is deleted after the import (:func:`download`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from entropy_jax.models.hf.safetensors_io import HFImportError

PYTHIA_TOKENS_PER_STEP = 2_097_152
PYTHIA_STEPS = (0, *(2**i for i in range(10)), *range(1000, 143_001, 1000))
# step1000; OLMo's step1000-tokens4B, stage1-step140000-tokens588B, stage2-ingredient1-step11931-tokens100B
_STEP = re.compile(r"^(?:stage\d+-(?:ingredient\d+-)?)?step(\d+)(?:[-_].*)?$")
_TOKENS = re.compile(r"-tokens(\d+(?:\.\d+)?)([KMBT]?)(?=[-_]|$)")
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.txt")


@dataclasses.dataclass(frozen=True)
class Revision:
    step: int
    folder: Path
    name: str  # the revision (branch) name, e.g. "step1000"
    commit: str = ""  # the Hub commit, where known (cache tree, download)
    repo: str = ""


def revision_step(name: str) -> int:
    """The training step a revision name stands for (``step1000`` -> 1000)."""
    m = _STEP.match(name)
    if not m:
        raise HFImportError(f"cannot read a training step from revision {name!r}; name revisions like 'step1000' "
                            "or 'stage1-step1000-tokens4B' (rename the folder, or import one folder with --step)")
    return int(m.group(1))


def is_revision_name(name: str) -> bool:
    """Whether ``name`` gives a training step (``step1000``, ``stage1-step140000-tokens588B``)."""
    return bool(_STEP.match(name))


def revision_tokens(name: str) -> int | None:
    """The training tokens a revision name states (``stage1-step140000-tokens588B`` -> 588 x 10^9), or None."""
    m = _TOKENS.search(name)
    return None if m is None else round(float(m.group(1)) * _UNITS[m.group(2)])


def tokens_seen(rev: Revision, model_type: str, tokens_per_step: int | None) -> tuple[int, int | None]:
    """(tokens seen at ``rev``, the tokens per step used or None): ``step x tokens_per_step`` where
    given; else the tokens the revision's name states; else, for GPT-NeoX (Pythia) only, Pythia's
    2,097,152 a step; step 0 has seen none. Otherwise an HFImportError: another family's batch
    size is never guessed."""
    if tokens_per_step is not None:
        if tokens_per_step < 1:
            raise HFImportError(f"--tokens_per_step={tokens_per_step} must be >= 1")
        return rev.step * tokens_per_step, tokens_per_step
    named = revision_tokens(rev.name)
    if named is not None:
        return named, None
    if model_type == "gpt_neox":
        return rev.step * PYTHIA_TOKENS_PER_STEP, PYTHIA_TOKENS_PER_STEP
    if rev.step == 0:
        return 0, None
    raise HFImportError(f"revision {rev.name!r} (step {rev.step}) of a {model_type} model names no token count: give "
                        f"--tokens_per_step (the model's batch size in tokens; Pythia's {PYTHIA_TOKENS_PER_STEP:,} "
                        "apply to GPT-NeoX models only)")


def _cache_revisions(repo_dir: Path) -> list[Revision]:
    """Revisions of one ``models--org--name`` cache folder whose snapshot is present."""
    repo = repo_dir.name.removeprefix("models--").replace("--", "/")
    out = []
    for ref in sorted((repo_dir / "refs").rglob("*")):
        if not ref.is_file():
            continue
        name, commit = str(ref.relative_to(repo_dir / "refs")), ref.read_text().strip()
        snapshot = repo_dir / "snapshots" / commit
        if _STEP.match(name) and (snapshot / "config.json").exists():
            out.append(Revision(revision_step(name), snapshot, name, commit, repo))
    return out


def find_revisions(paths: Iterable[str | Path], step: int | None = None) -> list[Revision]:
    """Revisions under ``paths`` (revision folders, folders of them, or Hub cache trees), by step.

    ``step`` names the step of a single folder whose name does not (e.g. a GPT-2 download).
    """
    found: list[Revision] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if not p.is_dir():
            raise HFImportError(f"--hf_dir={p} is not a folder")
        if (p / "config.json").exists():
            got = [Revision(revision_step(p.name) if step is None else step, p, p.name)]
        elif (p / "snapshots").is_dir():
            got = _cache_revisions(p)
        elif repos := sorted(p.glob("models--*")):
            got = [r for repo_dir in repos for r in _cache_revisions(repo_dir)]
        else:
            got = [Revision(revision_step(c.name), c, c.name) for c in sorted(p.iterdir())
                   if (c / "config.json").exists() and _STEP.match(c.name)]
        if not got:
            raise HFImportError(f"{p} has no config.json and holds no step<N> revision folders or Hugging Face cache "
                                "revisions (refs/step<N> with a snapshot); point --hf_dir at a model revision folder")
        found += got
    steps = [r.step for r in found]
    if len(set(steps)) != len(steps):
        raise HFImportError(f"several folders give the same step: {sorted(s for s in set(steps) if steps.count(s) > 1)}"
                            "; import one model per workdir")
    if step is not None and len(found) > 1:
        raise HFImportError("--step names the step of a single folder; several revisions were given")
    if not found:
        raise HFImportError("no --hf_dir given: name revision folders, folders of them, or a Hub cache tree")
    return sorted(found, key=lambda r: r.step)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HFImportError("downloading revisions needs huggingface_hub: pip install 'entropy_jax[hf]' "
                            "(or download the folders yourself and pass --hf_dir)") from None
    return huggingface_hub


def hub_revisions(repo: str) -> list[str]:
    """The ``step*`` branches of a Hub model repository, by step."""
    refs = _hub().list_repo_refs(repo)
    names = [b.name for b in refs.branches if _STEP.match(b.name)]
    return sorted(names, key=revision_step)


@contextlib.contextmanager
def download(repo: str, revision: str, step: int | None = None) -> Iterator[Revision]:
    """One revision's config, tokenizer and safetensors in a temporary folder, deleted afterwards
    (``step``: the step of a revision whose name gives none, e.g. ``main``)."""
    hub = _hub()
    files = hub.list_repo_files(repo, revision=revision)
    if not any(f.endswith(".safetensors") for f in files):
        raise HFImportError(f"revision {revision} of {repo} has no safetensors weights ({len(files)} files: "
                            f"{sorted(files)[:6]}...); .bin weights need torch to read: convert them with "
                            "transformers (save_pretrained(dir, safe_serialization=True)) and pass --hf_dir")
    tmp = Path(tempfile.mkdtemp(prefix="entropy_jax_hf_"))
    try:
        folder = Path(hub.snapshot_download(repo, revision=revision, local_dir=tmp,
                                            allow_patterns=list(DOWNLOAD_PATTERNS)))
        commit = hub.model_info(repo, revision=revision).sha or ""
        yield Revision(revision_step(revision) if step is None else step, folder, revision, commit, repo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
