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
paper's MLM batch of 25 prompts, is fed replicated instead; the step pads it to a multiple of the devices
with rows that change no loss (a prompt with no masked token) and splits it (:func:`split_rows`), so
each device computes its part of the MLM branch rather than all of it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlmjax import aot

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DATA_PARALLEL = {"data": -1, "fsdp": 1, "tensor": 1}  # every device a data-parallel replica
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


def describe_mesh(mesh: Mesh) -> str:
    """``data=2 fsdp=1 tensor=1 (2 cpu devices)``: one line a person can check."""
    platforms = sorted({device.platform for device in mesh.devices.flat})
    sizes = " ".join(f"{axis}={mesh.shape[axis]}" for axis in AXES)
    return f"{sizes} ({mesh.devices.size} {'/'.join(platforms)} device{'s' if mesh.devices.size > 1 else ''})"


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
    """Rows over (data, fsdp) when they divide evenly, else replicated (on every device of every
    process, which then each feed the whole array: see :func:`process_rows`)."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES) if rows % ways == 0 else PartitionSpec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that scales to many processes; ``shardings`` is one
    sharding for every leaf or a tree of them.

    Every process passes the same host (numpy) values, and each copies only the shards its own
    devices hold. ``jax.device_put`` of a host array onto devices of several processes would first
    all-gather the whole array from every process to check that they agree: for SD 1.5's UNet,
    3.4 GB times the number of hosts, on every host. Device arrays are resharded as usual.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def place(leaf: Any, leaf_sharding: jax.sharding.Sharding) -> jax.Array:
        if isinstance(leaf, jax.Array):
            # A reshard across processes is a collective. Gloo pairs the processes' collectives in the
            # order they run, and independent reshards in flight together may run in different orders
            # on different processes: once in CI one process hung in the sampler's weight placement
            # while the other had gone on to gather images. One at a time keeps them in step.
            return jax.block_until_ready(jax.device_put(leaf, leaf_sharding))
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, leaf_sharding, lambda index: leaf[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda leaf: place(leaf, shardings), tree)
    return jax.tree.map(place, tree, shardings)


def replicate_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """Random keys (the same on every process) replicated on ``mesh``, as the compiled step takes them.

    A key array cannot be placed on other processes' devices (only plain arrays can), so its raw
    data goes instead and is wrapped back into keys.
    """
    data = np.asarray(jax.device_get(jax.random.key_data(key)))
    return jax.random.wrap_key_data(put(data, replicated(mesh)), impl=jax.random.key_impl(key))


def held_rows(array_sharding: jax.sharding.Sharding, rows: int, devices=None) -> slice | np.ndarray:
    """Which rows of an array of ``rows`` rows, laid out by ``array_sharding``, ``devices`` hold (default
    this process's devices): the distinct row blocks of those devices, in increasing order.

    That is exactly the local data :func:`jax.make_array_from_process_local_data` expects from a
    process: it maps the i-th block of the local rows to the process's i-th smallest row block. All
    rows when the array is replicated (or the process's devices hold every block). A slice when the
    blocks are contiguous (``jax.make_mesh`` lists devices process by process, so they usually are),
    else an index array.
    """
    shape = (rows,)
    if devices is None:
        index_map = array_sharding.addressable_devices_indices_map(shape)
    else:
        wanted = set(devices)
        index_map = {d: index for d, index in array_sharding.devices_indices_map(shape).items() if d in wanted}
    blocks = sorted({(index[0].start or 0, rows if index[0].stop is None else index[0].stop)
                     for index in index_map.values()})
    if not blocks:
        raise ValueError("none of these devices holds a part of the array; is the mesh over this process's devices?")
    if all(stop == start for (_, stop), (start, _) in zip(blocks, blocks[1:])):
        return slice(blocks[0][0], blocks[-1][1])
    return np.concatenate([np.arange(start, stop) for start, stop in blocks])


def process_rows(batch: dict, mesh: jax.sharding.Mesh, devices=None) -> dict:
    """This process's part of a global batch: what it passes to ``jax.make_array_from_process_local_data``.

    Every process computes the same global batch from (seed, step) on the host, which is cheap (the
    images are cached moments), and keeps the rows its devices hold (:func:`held_rows`) under the
    array's :func:`batch_sharding`: its block of the rows when they divide the mesh's
    (data, fsdp) ways, every row when they do not (such an array is replicated: the paper's MLM batch
    of 25). ``shard_batch`` applies this rule, and only it. ``devices`` (default this
    process's) lets a test ask for another process's part.
    """
    out = {}
    for name, array in batch.items():
        array = np.asarray(array)
        out[name] = array[held_rows(batch_sharding(array.shape[0], mesh), array.shape[0], devices)]
    return out


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """The global batch (the same on every process) as global device arrays in :func:`batch_sharding`.

    With several processes each feeds only the rows its devices hold, :func:`process_rows`
    (all of them for a replicated array), through ``jax.make_array_from_process_local_data``.
    """
    batch = {name: np.asarray(rows) for name, rows in batch.items()}
    if jax.process_count() == 1:
        return {name: jax.device_put(rows, batch_sharding(rows.shape[0], mesh)) for name, rows in batch.items()}
    local = process_rows(batch, mesh)
    return {name: jax.make_array_from_process_local_data(batch_sharding(rows.shape[0], mesh), local[name], rows.shape)
            for name, rows in batch.items()}


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A train state's shardings: parameters, frozen weights and optimizer state by
    :func:`parameter_spec`, every scalar (the step, Adam's count) replicated."""
    return tree_shardings(state, mesh)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """``state`` moved onto ``mesh`` (a no-op for arrays already there). Host (numpy) leaves go
    straight to their shardings: each device receives only its shard (see :func:`put`)."""
    return put(state, state_shardings(state, mesh))


def init_on_mesh(init: Callable[[Any], Any], params: Any, mesh: Mesh) -> Any:
    """``init(params)`` (an optimizer's ``tx.init``) computed on the devices, each output leaf made
    directly in its :func:`parameter_spec` sharding: an AdamW moment is born sharded like its
    parameter, never whole on one device (an eager ``tx.init`` puts every zero on device 0)."""
    shardings = tree_shardings(jax.eval_shape(init, params), mesh)
    return jax.jit(init, out_shardings=shardings)(params)


def initial_leaves(params: Any, frozen: Any, init: Callable[[Any], Any], mesh: Mesh | None) -> tuple[Any, ...]:
    """``(step, params, frozen, opt_state)`` of a train state at step 0.

    With ``mesh`` every leaf is created in its sharding: ``params`` and ``frozen`` (numpy on the
    host) go straight to their shards and the optimizer state is born sharded (:func:`init_on_mesh`),
    so no device ever holds an unsharded copy. Without, everything is on the default device.
    """
    if mesh is None:
        return jnp.zeros((), jnp.int32), params, frozen, init(params)
    step, params, frozen = shard_state((np.zeros((), np.int32), params, frozen), mesh)
    return step, params, frozen, init_on_mesh(init, params, mesh)


def _signature(tree: Any) -> tuple:
    """What an AOT executable is specific to: the tree structure and every leaf's shape, dtype, weak
    type and sharding (arrays and ``ShapeDtypeStruct``s alike)."""
    def leaf(x):
        return (tuple(np.shape(x)), str(x.dtype), bool(getattr(x, "weak_type", False)), getattr(x, "sharding", None))
    return jax.tree.structure(tree), tuple(leaf(x) for x in jax.tree.leaves(tree))


def _traced_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh the step is traced under (:func:`jit_step` traces under its mesh), if it has batch axes."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) else mesh


def batch_ways() -> int:
    """Over how many devices the traced mesh splits a batch's rows (1 outside any mesh)."""
    mesh = _traced_mesh()
    return 1 if mesh is None else math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def split_rows(x: jax.Array, axis: int = 0) -> jax.Array:
    """``x`` with its rows (``axis``) split over the batch axes of the traced mesh, evenly or not;
    unchanged outside any mesh."""
    if _traced_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*[None] * axis, BATCH_AXES))


def whole(x: jax.Array) -> jax.Array:
    """``x`` held whole by every device of the traced mesh; unchanged outside any mesh."""
    return x if _traced_mesh() is None else jax.lax.with_sharding_constraint(x, PartitionSpec())


def _without_frozen(state: Any) -> tuple[Any, Any]:
    return state.replace(frozen=None), state.frozen


def _call_joined(step: Callable, state: Any, batch: dict, rng: jax.Array) -> tuple[Any, dict]:
    """``step`` (jitted or compiled ``_frozen_apart``) on the whole state, its frozen weights handed back."""
    carried, frozen = _without_frozen(state)
    new_state, metrics = step(carried, frozen, batch, rng)
    return new_state.replace(frozen=frozen), metrics


def _frozen_apart(step_fn: Callable, mesh: Mesh) -> Callable:
    """``step_fn(state, batch, rng)`` as ``step(state without its frozen weights, frozen, batch, rng)``,
    returning the state without them: what :func:`jit_step` compiles."""
    def step(carried, frozen, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            state, metrics = step_fn(carried.replace(frozen=frozen), batch, rng)
        # Identity of the traced leaves: the step must hand the frozen weights back as it got them.
        if jax.tree.structure(state.frozen) != jax.tree.structure(frozen) or any(
                new is not old for new, old in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen))):
            raise ValueError(f"{getattr(step_fn, '__name__', step_fn)} changed state.frozen; a jitted step may "
                             "only change the step, the trained parameters and the optimizer state")
        return state.replace(frozen=None), metrics
    return step


class _JoinedExecutable:
    """A compiled ``_frozen_apart`` step called as the step itself: ``(state, batch, rng) -> (state,
    metrics)``; XLA's analyses (``cost_analysis``, ``memory_analysis``, ``as_text``) pass through."""

    def __init__(self, executable: Any):
        self._executable = executable

    def __call__(self, state, batch, rng):
        return _call_joined(self._executable, state, batch, rng)

    def __getattr__(self, name: str):
        return getattr(self._executable, name)


class _JoinedLowered:
    """A lowered ``_frozen_apart`` step whose ``compile`` gives a :class:`_JoinedExecutable`."""

    def __init__(self, lowered: jax.stages.Lowered):
        self._lowered = lowered

    def compile(self, *args, **kwargs) -> _JoinedExecutable:
        return _JoinedExecutable(self._lowered.compile(*args, **kwargs))

    def __getattr__(self, name: str):
        return getattr(self._lowered, name)


class StepFunction:
    """A jitted step ``(state, batch, rng) -> (state, metrics)``, state kept in its shardings, and its
    ahead-of-time executables.

    The state's trained parameters, optimizer state and step are donated; its frozen weights (all of
    a UNet and text encoder for Textual Inversion) are passed apart, not donated and not returned, so
    the step hands back only what it changed. Every array a call returns costs the runtime about a
    microsecond: returning the tiny TI state's 400 frozen weights took 0.5 ms of its 15 ms step.

    Call it like the jitted function, or :meth:`compile` it for given arguments first and call the
    returned :class:`~mlmjax.aot.Compiled`: that compiles exactly once per argument signature, with the
    compile time, FLOPs and memory measured, and a later run in the same process with the same
    shapes and shardings (a resumed run) gets the same executable back. :meth:`lower` gives what
    ``jax.jit(...).lower`` would, compiling to an executable called the same way.
    """

    def __init__(self, jitted: Any):
        self.jitted = jitted  # of _frozen_apart(step_fn)
        self._compiled: dict[tuple, aot.Compiled] = {}

    def __call__(self, state, batch, rng):
        return _call_joined(self.jitted, state, batch, rng)

    def lower(self, state, batch, rng) -> _JoinedLowered:
        return _JoinedLowered(self.jitted.lower(*_without_frozen(state), batch, rng))

    def has_compiled(self, *args) -> bool:
        """Whether :meth:`compile` already made the executable for ``args``."""
        return _signature(args) in self._compiled

    def compile(self, *args) -> aot.Compiled:
        """The executable for ``args`` (arrays or ``ShapeDtypeStruct``s with shardings), compiled once."""
        key = _signature(args)
        if key not in self._compiled:
            self._compiled[key] = aot.compile_step(self, *args)
        return self._compiled[key]

    def _cache_size(self) -> int:
        """Executables made so far, by calls and by :meth:`compile` (``jax.jit``'s own count covers calls only)."""
        return self.jitted._cache_size() + len(self._compiled)


_JITTED: dict[tuple, StepFunction] = {}


def jit_step(step_fn: Any, state: Any, mesh: Mesh) -> StepFunction:
    """``jax.jit(step_fn)`` with the state donated (all but its ``frozen`` weights, see
    :class:`StepFunction`) and kept in its shardings from step to step.

    Without fixed output shardings XLA may hand back a parameter sharded differently from how it came
    in, and the next step would compile again. One :class:`StepFunction` per (step function, mesh,
    state layout), so runs of the same shape in one process share the executable.
    """
    layout = jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype)), state)
    key = (step_fn, mesh, jax.tree.structure(state), tuple(jax.tree.leaves(layout)))
    if key not in _JITTED:
        carried = _without_frozen(state)[0]
        _JITTED[key] = StepFunction(jax.jit(_frozen_apart(step_fn, mesh), donate_argnums=0,
                                            out_shardings=(state_shardings(carried, mesh), replicated(mesh))))
    return _JITTED[key]
