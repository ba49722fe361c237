"""Published checkpoints from Hugging Face safetensors, without torch: Pythia (GPT-NeoX), GPT-2,
and any other registered family.

    from entropy_jax.models import hf
    model = hf.load_hf_checkpoint("/data/pythia-160m/step1000")
    logits_BxTxV, inter = model(tokens_BxT, return_intermediates=True)

``inter["residual"]`` holds the L + 1 hidden states in the order of transformers'
``output_hidden_states`` (embedding output first, the last one after the final norm). Modules:
``safetensors_io`` (files), ``families`` (one module per architecture: its config.json mapping
and tensor layout, registered by ``model_type``), ``configs`` / ``convert`` (config.json and
tensors through the family), ``load`` (the model, optionally FSDP-sharded), ``probe_text``
(tokenised probe sequences), ``revisions`` (revision names, folders, the Hub cache and
downloads), ``record`` (checkpoint metadata of an imported revision; weight matrices straight
from files).
"""

from entropy_jax.models.hf.configs import model_config, read_config, tokenizer_size
from entropy_jax.models.hf.convert import convert
from entropy_jax.models.hf.load import (
    HFCheckpoint,
    check_hf_folder,
    load_hf_checkpoint,
    read_hf_checkpoint,
)
from entropy_jax.models.hf.probe_text import probe_tokens
from entropy_jax.models.hf.record import probe_source, revision_meta, weight_matrices
from entropy_jax.models.hf.revisions import Revision, find_revisions, revision_step
from entropy_jax.models.hf.safetensors_io import HFImportError, read_tensors, weight_files

__all__ = [
    "HFCheckpoint",
    "HFImportError",
    "Revision",
    "check_hf_folder",
    "find_revisions",
    "probe_source",
    "probe_tokens",
    "revision_meta",
    "revision_step",
    "weight_matrices",
    "convert",
    "load_hf_checkpoint",
    "model_config",
    "read_config",
    "read_hf_checkpoint",
    "read_tensors",
    "tokenizer_size",
    "weight_files",
]
