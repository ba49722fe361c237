"""Byte-level text corpora: a TFDS builder over a local folder, and published TFDS text sets.

Tokens are bytes (vocab 256). A split's documents are concatenated in record order into one
byte stream (cached once as ``packed-<split>.u8.npy`` next to the prepared files) and cut into
windows of T + 1 bytes with stride T, so every byte is a target exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from entropy_jax.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".py")
VALIDATION_FRACTION = 0.1  # the last 10% of every file's bytes
PUBLISHED_TEXT = ("lm1b", "tiny_shakespeare")
_CHUNK_BYTES = 1 << 20


def text_files(text_dir: str) -> list[pathlib.Path]:
    """The .txt/.md/.py files under ``text_dir`` (recursive, sorted); clear error if missing."""
    root = pathlib.Path(text_dir).expanduser()
    if not text_dir or not root.is_dir():
        raise FileNotFoundError(f"data.text_dir {str(root)!r} is not a directory (text_folder needs one)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files under {str(root)!r}")
    return files


class TextFolderConfig(tfds.core.BuilderConfig):
    """Names itself by a hash of the folder's path, file names and contents."""

    def __init__(self, text_dir: str):
        files = text_files(text_dir)  # checks the folder before "" could resolve to the cwd
        root = pathlib.Path(text_dir).expanduser().resolve()
        digest = hashlib.sha256(str(root).encode())
        for f in files:
            f = f.resolve()
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
        super().__init__(name=f"folder-{digest.hexdigest()[:12]}", description=str(root))
        self.text_dir = str(root)


class TextFolder(tfds.core.GeneratorBasedBuilder):
    """Every file split by bytes: the first 90% to train, the last 10% to validation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Byte-level chunks of local text files."}
    # No checksums / package metadata files: skips a lookup that needs importlib_resources.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Bytes of local text files, in file order, in chunks of up to 1 MiB.",
            features=tfds.features.FeaturesDict(
                {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.uint8)}
            ),
            metadata=tfds.core.MetadataDict(text_dir=self.builder_config.text_dir),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(False), "validation": self._generate_examples(True)}

    def _generate_examples(self, validation: bool):
        key = 0
        for f in text_files(self.builder_config.text_dir):
            data = f.read_bytes()
            cut = len(data) - int(len(data) * VALIDATION_FRACTION)
            part = data[cut:] if validation else data[:cut]
            for start in range(0, len(part), _CHUNK_BYTES):
                yield key, {"tokens": np.frombuffer(part[start : start + _CHUNK_BYTES], np.uint8)}
                key += 1


class PackedTokens:
    """Random-access windows {"tokens": int32 [T + 1]} with stride T over a byte stream."""

    def __init__(self, stream: np.ndarray, seq_len: int, where: str = "split"):
        if stream.size < seq_len + 1:
            raise ValueError(f"{where} has {stream.size} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return (self.stream.size - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.seq_len
        return {"tokens": self.stream[start : start + self.seq_len + 1].astype(np.int32)}


def _record_bytes(record: dict) -> bytes:
    if "tokens" in record:
        return np.asarray(record["tokens"], np.uint8).tobytes()
    text = record["text"]
    return (text if isinstance(text, bytes) else str(text).encode()) + b"\n"


def packed_stream(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
    """The split's bytes concatenated in record order, cached as a memory-mapped .npy file."""
    path = os.path.join(os.fspath(builder.data_path), f"packed-{split}.u8.npy")
    if not os.path.exists(path):
        source = builder.as_data_source(split)
        stream = np.frombuffer(b"".join(_record_bytes(source[i]) for i in range(len(source))), np.uint8)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            np.save(fh, stream)
        os.replace(tmp, path)  # atomic: concurrent processes never read a partial cache
    return np.load(path, mmap_mode="r")


class DatasetUnavailableError(UserError, FileNotFoundError):
    """A published dataset is not prepared and could not be downloaded (offline, or disabled)."""


_NETWORK_ERRORS = ("ConnectionError", "Timeout", "gaierror", "NameResolutionError", "MaxRetryError", "URLError",
                   "SSLError", "ProxyError")


def download_failure(e: BaseException) -> str:
    """Why a TFDS download failed, in words: a missing Python package, the network, or ``e`` itself."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for c in chain:
        if isinstance(c, ImportError):
            return f"the Python package {c.name!r} is missing (pip install {c.name})"
    for c in chain:
        if isinstance(c, (ConnectionError, TimeoutError)) or any(n in type(c).__name__ for n in _NETWORK_ERRORS):
            return f"the network is unreachable from here ({type(c).__name__}: {c})"
    return f"{type(chain[0]).__name__}: {chain[0]}"


def _published_builder(name: str, data_dir: str, download: bool) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a published text set, prepared (downloads if allowed and online)."""
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    if not download:
        why = "downloading is disabled (data.download=False)"
    else:
        try:
            builder.download_and_prepare()
            return builder
        except Exception as e:  # whatever TFDS raised: said in words below
            why = download_failure(e)
    raise DatasetUnavailableError(
        f"TFDS dataset {name!r} is not prepared in {data_dir!r} as array_record and could not be downloaded: "
        f"{why}. On a machine with internet run `tfds build {name} --file_format=array_record "
        f"--data_dir={data_dir}` and copy the folder here, or use an embedded corpus (data.name='markov')."
    )


def _prepare_here(make_builder: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
    builder = make_builder()
    builder.download_and_prepare()
    return builder


def load_text_corpus(
    name: str, text_dir: str, seq_len: int, data_dir: str, download: bool = True,
    prepare: Callable[[Callable[[], tfds.core.DatasetBuilder]], tfds.core.DatasetBuilder] | None = None,
) -> dict:
    """train / validation / info fields of a byte-level text Corpus.

    Published sets use their ``validation`` split, or ``test`` where there is none (lm1b).
    ``prepare`` runs a builder factory's preparation (multi-host ordering); default: directly.
    """
    if name == "text_folder":
        config = TextFolderConfig(text_dir)
        make = lambda: TextFolder(config=config, data_dir=data_dir, file_format="array_record")
        builder = (prepare or _prepare_here)(make)
    elif name in PUBLISHED_TEXT:
        builder = _published_builder(name, data_dir, download)
    else:
        raise ValueError(f"{name!r} is not a text corpus; valid: text_folder, {', '.join(PUBLISHED_TEXT)}")
    splits = builder.info.splits
    val_split = "validation" if "validation" in splits else "test"
    train = PackedTokens(packed_stream(builder, "train"), seq_len, f"{name} train")
    validation = PackedTokens(packed_stream(builder, val_split), seq_len, f"{name} {val_split}")
    info = {
        "builder": builder.name, "config": builder.builder_config.name if builder.builder_config else "",
        "version": str(builder.version), "data_dir": data_dir, "path": os.fspath(builder.data_path),
        "tokenizer": "bytes", "validation_split": val_split, "num_train": len(train),
        "num_validation": len(validation), "train_bytes": int(train.stream.size),
    }
    return {"train": train, "validation": validation, "info": info}
