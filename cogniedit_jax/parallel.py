"""Device mesh and shardings for training: mesh axes `data` x `fsdp`, frozen weights FSDP-sharded, the small
trainable pytree and its optimizer state replicated, batch rows over the whole mesh.

Frozen params: each leaf is split over `fsdp` along its largest axis that the axis size divides, never the
stacked layer axis 0 of `blocks/*` (the block `lax.scan` slices it), and replicated over `data`. A leaf with
no such axis stays replicated (norm scales, small biases). XLA gathers each block's weights inside the scan.

Multi-host: `maybe_initialize_distributed` starts `jax.distributed` when the environment names a coordinator
(or a cluster launcher that jax detects on its own); then every host feeds its slice of the global batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # batch rows over every device
# Variables under which jax.distributed.initialize() finds its cluster without arguments.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when this looks like a multi-process launch; True if it ran.
    COGNIEDIT_DISTRIBUTED=0/1 forces the choice."""
    forced = os.environ.get("COGNIEDIT_DISTRIBUTED")
    wanted = forced == "1" if forced in ("0", "1") else any(os.environ.get(k) for k in _CLUSTER_ENV)
    if wanted:
        jax.distributed.initialize()
    return wanted


def mesh_shape(data: int, fsdp: int, device_count: int) -> tuple[int, int]:
    """(data, fsdp) with -1 meaning "the remaining devices"; the product must be the device count."""
    if (data, fsdp).count(-1) > 1:
        raise ValueError(f"mesh.data={data}, mesh.fsdp={fsdp}: at most one may be -1")
    if -1 in (data, fsdp):
        other = fsdp if data == -1 else data
        if other < 1 or device_count % other:
            raise ValueError(f"mesh: {other} does not divide the {device_count} devices")
        data, fsdp = (device_count // other, other) if data == -1 else (other, device_count // other)
    if data < 1 or fsdp < 1 or data * fsdp != device_count:
        raise ValueError(
            f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp}, but there are {device_count} "
            "devices: the product must equal the device count"
        )
    return data, fsdp


def make_mesh(data: int = 1, fsdp: int = -1, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(data, fsdp, len(devices))
    # Mesh (not jax.make_mesh): Auto axes, so shardings inside jit are left to the compiler's propagation.
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def fsdp_spec(path: str, shape: tuple[int, ...], fsdp: int) -> P:
    """The PartitionSpec of a frozen leaf: its largest axis divisible by `fsdp` (ties: the last one), except
    axis 0 of stacked block params."""
    candidates = [
        i
        for i, n in enumerate(shape)
        if n % fsdp == 0 and n >= fsdp and not (i == 0 and path.startswith("blocks/"))
    ]
    if fsdp == 1 or not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], i))
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def frozen_shardings(abstract_params, mesh: Mesh):
    """NamedShardings (one per leaf of `abstract_params`, a nested dict of arrays or ShapeDtypeStructs)."""
    flat = traverse_util.flatten_dict(abstract_params, sep="/")
    fsdp = mesh.shape["fsdp"]
    return traverse_util.unflatten_dict(
        {k: NamedSharding(mesh, fsdp_spec(k, tuple(v.shape), fsdp)) for k, v in flat.items()}, sep="/"
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows_sharding(mesh: Mesh, shape: tuple[int, ...], axis: int = 0) -> NamedSharding:
    """Rows (axis `axis`) over every device when the device count divides them, else replicated."""
    if shape[axis] % mesh.size:
        return replicated(mesh)
    return NamedSharding(mesh, P(*([None] * axis + [BATCH_AXES])))


def put_global(tree, shardings):
    """Host numpy arrays that are identical on every process -> global jax.Arrays with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree,
        shardings,
    )


def gather_hosts(tree):
    """Each process's numpy rows concatenated in process order (identity on one process)."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def gather_texts(texts: list[str]) -> list[str]:
    """Each process's strings concatenated in process order (UTF-8 bytes through a padded uint8 array)."""
    if jax.process_count() == 1:
        return list(texts)
    raw = [t.encode() for t in texts]
    width = int(np.max(gather_hosts(np.array([max(map(len, raw), default=0)]))))
    padded = np.zeros((len(raw), max(width, 1)), np.uint8)
    for i, b in enumerate(raw):
        padded[i, : len(b)] = np.frombuffer(b, np.uint8)
    lengths, rows = gather_hosts((np.array([len(b) for b in raw]), padded))
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths)]


def local_rows(array: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, rows) of a global array's axis 0 held by this process's devices, in row order."""
    if jax.process_count() == 1:
        return np.arange(array.shape[0]), np.asarray(jax.device_get(array))
    parts = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        parts[start] = np.asarray(shard.data)
    rows = np.concatenate([parts[s] for s in sorted(parts)])
    index = np.concatenate([np.arange(s, s + parts[s].shape[0]) for s in sorted(parts)])
    return index, rows
