"""The device mesh and the few helpers around it.

One mesh with a single ``data`` axis over every device of every process. Batches are
sharded with ``P("data")``; parameters are replicated, or split FSDP-style over ``data``
(:func:`fsdp_sharding`) where a model is larger than one device's memory. The axis type is
``Auto``: model code stays free of sharding annotations and XLA inserts the gradient
all-reduce. Per-device code (probe statistics) uses ``jax.shard_map`` with an explicit ``psum``
instead.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Start JAX's multi-process runtime when this process is one of several.

    SLURM and TPU pods are detected by ``jax.distributed.initialize()`` itself. Elsewhere set
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` on every process. On CPU the processes' collectives run over gloo (TCP).
    Alone on one machine nothing happens.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    launched = explicit or any(k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))
    if not launched or jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit and "JAX_NUM_PROCESSES" in os.environ:
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``num_devices`` devices (default: all)."""
    n = num_devices or jax.device_count()
    if n > jax.device_count():
        raise ValueError(f"asked for {n} devices but only {jax.device_count()} are present")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], num_devices: int) -> P:
    """FSDP-style placement of one array: its largest axis divisible by the device count split
    over ``data``; replicated when no axis divides (biases of odd width, scalars)."""
    axes = [a for a in np.argsort(shape)[::-1] if shape[a] % num_devices == 0 and shape[a] >= num_devices]
    if num_devices == 1 or not axes:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = DATA_AXIS
    return P(*spec)


def fsdp_sharding(tree: Any, mesh: Mesh) -> Any:
    """:func:`fsdp_spec` for every leaf of ``tree`` (arrays or shape structs) as NamedShardings."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.devices.size)), tree)


def shard_batch(batch, mesh: Mesh, axis: int = 0):
    """Place a host-local batch (pytree of numpy arrays, this process's rows) on the mesh, its
    ``axis`` (the batch axis; 1 for a block of batches stacked on a leading step axis) split over ``data``."""
    sharding = NamedSharding(mesh, P(*[None] * axis, DATA_AXIS))
    n = mesh.devices.size
    for x in jax.tree.leaves(batch):
        if x.shape[axis] * jax.process_count() % n:
            raise ValueError(
                f"global batch {x.shape[axis] * jax.process_count()} is not divisible by the "
                f"{n} devices of the mesh; choose a batch size that is a multiple of {n}"
            )
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def is_writer() -> bool:
    """Only process 0 writes files."""
    return jax.process_index() == 0
