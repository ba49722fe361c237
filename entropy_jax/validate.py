"""Check everything before writing: the checks that need more than one layer's knowledge.

Each check raises :class:`entropy_jax.errors.UserError` with one line naming the problem and the
fix; the entry points print it and exit with status 2 (see :mod:`entropy_jax.cli`). The checks
themselves live with what they check (the config sections in :mod:`entropy_jax.config`, a
workdir's resume in :mod:`entropy_jax.train.start`, a loss and a probe type in their registries,
a probe run in :mod:`entropy_jax.sweep.probe_set`); this module only calls them in order.

    run = check_config(cfg)       # typed config; the loss and the probes by their registries; device count
"""

from __future__ import annotations

import jax
import ml_collections

from entropy_jax.config import RunConfig
from entropy_jax.errors import UserError
from entropy_jax.sweep.probe_set import check_probe_config
from entropy_jax.train.objective import make_loss
from entropy_jax.train.start import parent_checkpoint


def check_config(cfg: ml_collections.ConfigDict, device_count: int | None = None) -> RunConfig:
    """The typed run config, after every check that needs only the config, the registries (losses,
    probe types), the parent checkpoint's presence and the device count: raises UserError."""
    run = RunConfig.from_config(cfg)
    check_probe_config(cfg)
    try:
        make_loss(run.train.loss)
    except ValueError as e:
        raise UserError(str(e)) from e
    if run.init_from.workdir:
        parent_checkpoint(run.init_from)
    devices = jax.device_count() if device_count is None else device_count
    if run.train.batch_size % devices:
        raise UserError(f"train.batch_size={run.train.batch_size} is not divisible by the {devices} devices: use a "
                        f"multiple of {devices}, e.g. {max(devices, run.train.batch_size // devices * devices)}")
    return run
