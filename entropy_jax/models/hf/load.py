"""Load a Hugging Face revision folder (config.json + safetensors) into the NNX Transformer, exactly.

    model = load_hf_checkpoint("/data/pythia-160m/step1000")
    logits_BxTxV = model(tokens_BxT)
    logits_BxTxV, inter = model(tokens_BxT, return_intermediates=True)   # inter["residual"]: L + 1 states

Parameters are replicated over the mesh by default; ``fsdp=True`` splits each one over the
``data`` axis (:func:`entropy_jax.sharding.fsdp_sharding`), so a model larger than one device's
memory loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from entropy_jax.models.build import build_model
from entropy_jax.models.hf.configs import model_config, read_config, tokenizer_size
from entropy_jax.models.hf.convert import convert
from entropy_jax.models.hf.safetensors_io import (
    HFImportError,
    file_sha256,
    iter_tensors,
    read_tensors,
    tensor_specs,
    weight_files,
)
from entropy_jax.models.transformer import ModelConfig
from entropy_jax.sharding import DATA_AXIS, fsdp_sharding, replicated


@dataclasses.dataclass
class HFCheckpoint:
    """One imported revision: its model config, split NNX model, and provenance."""

    model_type: str
    model_config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    model_state: nnx.State
    hf_config: dict
    tokenizer_size: int | None
    files: dict[str, str]  # weight file name -> sha256

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.model_state)


def _place(abstract: nnx.State, pure: dict, mesh: jax.sharding.Mesh, fsdp: bool) -> nnx.State:
    nnx.replace_by_pure_dict(abstract, pure)
    shardings = fsdp_sharding(abstract, mesh) if fsdp else jax.tree.map(lambda _: replicated(mesh), abstract)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s), abstract, shardings)


def check_hf_folder(folder: str | Path) -> ModelConfig:
    """Every refusal :func:`read_hf_checkpoint` would raise: config.json and the checked safetensors
    headers (names, shapes, dtypes) first, then the values streamed one tensor at a time (memory
    bounded by the largest; NaN or inf refused), so the import validates all revisions before it
    writes anything."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFImportError(f"{folder} is not a folder; point --hf_dir at a downloaded model revision")
    hf = read_config(folder)
    cfg = model_config(hf, tokenizer_size(folder))
    zeros = {n: np.broadcast_to(np.zeros((), d), s) for n, (d, s) in tensor_specs(folder).items()}
    convert(hf["model_type"], cfg, zeros, where=str(folder))
    for _ in iter_tensors(folder):
        pass
    return cfg


def read_hf_checkpoint(folder: str | Path, mesh: jax.sharding.Mesh | None = None, fsdp: bool = False,
                       hash_files: bool = True) -> HFCheckpoint:
    """Read and convert one revision folder; every refusal is an HFImportError with one clear line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFImportError(f"{folder} is not a folder; point --hf_dir at a downloaded model revision")
    hf = read_config(folder)
    tokens = tokenizer_size(folder)
    cfg = model_config(hf, tokens)
    files = weight_files(folder)
    params_pure, state_pure = convert(hf["model_type"], cfg, read_tensors(folder), where=str(folder))
    graphdef, abstract_params, abstract_state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, 0)),
                                                          nnx.Param, ...)
    mesh = mesh or jax.make_mesh((1,), (DATA_AXIS,), devices=jax.devices()[:1])
    params = _place(abstract_params, params_pure, mesh, fsdp)
    model_state = _place(abstract_state, state_pure, mesh, fsdp)
    digests = {f.name: file_sha256(f) if hash_files else "" for f in files}
    return HFCheckpoint(hf["model_type"], cfg, graphdef, params, model_state, hf, tokens, digests)


def load_hf_checkpoint(folder: str | Path, mesh: jax.sharding.Mesh | None = None, fsdp: bool = False) -> nnx.Module:
    """The NNX model with the weights of a Hugging Face revision folder (any registered family)."""
    return read_hf_checkpoint(folder, mesh, fsdp, hash_files=False).model()
