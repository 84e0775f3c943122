"""How a run spreads over devices: a (data, fsdp, tensor) mesh, parameter and batch shardings.

* **data**: examples split over devices; parameters replicated.
* **fsdp**: examples split too, and every large parameter (trained or frozen) and its optimizer state
  sharded along its largest dimension that the axis divides, so DreamBooth's UNet, text encoder and
  AdamW moments are spread instead of copied (XLA gathers each layer's weights when it is used).
* **tensor**: the output dimension of large matrices (and convolution channels) split, when divisible.

``config.mesh.{data,fsdp,tensor}`` sets the sizes; one ``-1`` takes the devices left. The same seed
gives the same losses on any mesh (``jax_threefry_partitionable``, on by default in jax ≥ 0.5: random
bits do not depend on how an array is sharded).

A batch's rows go over ``("data", "fsdp")``. A batch that does not divide that many devices, like the
paper's MLM batch of 25 prompts, is replicated instead: each device computes it whole, the result is
the same, and the step still runs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated: sharding them saves nothing and costs collectives.
MIN_SHARDED_SIZE = 2**14


def mesh_shape(mesh_config: ml_collections.ConfigDict | dict, device_count: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` with one ``-1`` filled, checked against ``device_count``."""
    sizes = [int(mesh_config[axis]) for axis in AXES]
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"config.mesh={dict(zip(AXES, sizes))}: sizes must be positive, with at most one -1")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"config.mesh={dict(zip(AXES, sizes))}: {device_count} devices do not divide by {known}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(f"config.mesh={dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices; there are "
                         f"{device_count}: make the product match or set one axis to -1")
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict | dict, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default all, every process's)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: jit propagates the shardings we give its inputs and outputs.
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def parameter_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Where one parameter (or optimizer moment) lives: see the module docstring."""
    spec: list[Any] = [None] * len(shape)
    if math.prod(shape) < MIN_SHARDED_SIZE:
        return PartitionSpec(*spec)
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    if tensor > 1 and len(shape) >= 2 and shape[-1] % tensor == 0:  # kernels are [..., in, out]
        spec[-1] = "tensor"
    if fsdp > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A :class:`NamedSharding` for every array leaf of ``tree`` (parameters, optimizer state)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, parameter_spec(tuple(np.shape(x)), mesh)), tree)


def batch_sharding(rows: int, mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp) when they divide evenly, else replicated."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES) if rows % ways == 0 else PartitionSpec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """A host batch (this process's rows, see ``pipeline.process_rows``) as global device arrays."""
    out = {}
    for name, rows in batch.items():
        rows = np.asarray(rows)
        global_rows = rows.shape[0] * jax.process_count()
        sharding = batch_sharding(global_rows, mesh)
        if jax.process_count() == 1:
            out[name] = jax.device_put(rows, sharding)
        else:
            out[name] = jax.make_array_from_process_local_data(sharding, rows, (global_rows, *rows.shape[1:]))
    return out


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A train state's shardings: parameters, frozen weights and optimizer state by
    :func:`parameter_spec`, every scalar (the step, Adam's count) replicated."""
    return tree_shardings(state, mesh)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """``state`` moved onto ``mesh`` (a no-op for arrays already there)."""
    return jax.device_put(state, state_shardings(state, mesh))


_JITTED: dict[tuple, Any] = {}


def jit_step(step_fn: Any, state: Any, mesh: Mesh) -> Any:
    """``jax.jit(step_fn)`` with the state donated and kept in its shardings from step to step.

    Without fixed output shardings XLA may hand back a parameter sharded differently from how it came
    in, and the next step would compile again. One jitted function per (step function, mesh, state
    layout), so runs of the same shape in one process share the executable.
    """
    layout = jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype)), state)
    key = (step_fn, mesh, jax.tree.structure(state), tuple(jax.tree.leaves(layout)))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings(state, mesh), replicated(mesh)))
    return _JITTED[key]
