"""Revisions of a published model: their names, local folders, the Hugging Face cache tree, downloads.

Pythia publishes 154 revisions per model as branches ``step0``, ``step1``, ``step2``, ``step4`` ...
``step512``, ``step1000``, then every 1000 to ``step143000`` (2,097,152 tokens per step: 1,024
sequences of 2,048 tokens). A revision is found three ways:

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
_STEP = re.compile(r"^step(\d+)(?:[-_].*)?$")  # step1000, OLMo's step1000-tokens4B
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
                            "(rename the folder, or import one folder with --step)")
    return int(m.group(1))


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
def download(repo: str, revision: str) -> Iterator[Revision]:
    """One revision's config, tokenizer and safetensors in a temporary folder, deleted afterwards."""
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
        yield Revision(revision_step(revision), folder, revision, commit, repo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
