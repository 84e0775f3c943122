"""Run by tests/test_multihost.py: one TI + MLM step on global meshes, as one process of two
(``multihost_check.py PROCESS_ID PORT [MESH ...]``, 4 host devices each, ``jax.distributed`` over localhost) or as a
single process with 8 host devices (``multihost_check.py``). Process 0 (or the single process) prints
one JSON line: per mesh, the step's metrics and whether every device holds the batch rows it should.
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlmjax import distributed  # noqa: E402

# (2, 4, 1) is checked too, through test_multihost's end-to-end runs: process 1 of a pair never finds
# its executable in the compilation cache (process 0 alone writes it, and the key names the process),
# so every mesh here costs a full compile. `multihost_check.py ... 2,4,1` adds meshes by hand.
MESHES = [(8, 1, 1)] + [tuple(int(n) for n in arg.split(",")) for arg in sys.argv[3:]]


def rows_in_place(batch: dict, placed: dict) -> bool:
    """Whether every device of this process holds exactly the rows of the global batch its index names."""
    return all(np.array_equal(np.asarray(shard.data), batch[name][shard.index])
               for name, array in placed.items() for shard in array.addressable_shards)


def config_flags_free_load(path: str):
    """``get_config()`` of a config file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def local_rows(array: jax.Array) -> int:
    """How many distinct rows of the global array this process's devices hold."""
    rows = np.arange(array.shape[0])
    return len(np.unique(np.concatenate([rows[shard.index[0]] for shard in array.addressable_shards])))


def main() -> None:
    if len(sys.argv) >= 3:
        distributed.initialize(f"localhost:{sys.argv[2]}", 2, int(sys.argv[1]), initialization_timeout=120)
    # Imported after initialize: nothing may touch a device before it.
    from mlmjax import method, sharding
    from mlmjax import train as train_lib
    from mlmjax import train_step as train_step_lib
    from test_train_step import CONFIGS

    assert jax.device_count() == 8, jax.devices()
    # TI + MLM on the embedded default, configured as test_multihost's `python -m mlmjax.train` runs
    # are (configs/ti.py, batch 8): the same step program, so the two tests share compiled steps.
    config = config_flags_free_load(os.path.join(CONFIGS, "ti.py"))
    config.batch_size = 8  # divides 8 devices; the MLM batch of 25 does not (replicated)
    config = train_lib._resolve_embedded(config)
    model, concept_images = train_lib._read_inputs(config)
    first = sharding.make_mesh(dict(zip(sharding.AXES, MESHES[0])))
    setup = method.build(config, model, concept_images=concept_images, class_images=None,
                         contextualizer_folder=config.mlm.contextualizer, mesh=first)
    batch, rng = setup.make_batch(0), jax.random.key(0)
    out = {"process_count": jax.process_count(), "meshes": {}}
    for shape in MESHES:
        mesh = sharding.make_mesh(dict(zip(sharding.AXES, shape)))
        # A fresh copy on this mesh: the step donates the state it is given.
        state = jax.device_put(setup.state, sharding.state_shardings(setup.state, mesh), may_alias=False)
        placed = sharding.shard_batch(batch, mesh)
        key = sharding.replicate_key(rng, mesh)  # as resumable places the run's key
        # Compiled ahead, then a barrier: a process that finds the step in the compilation cache
        # would otherwise wait for the other's compile in its first collective (gloo gives up at 30 s).
        step = sharding.jit_step(train_step_lib.train_step, state, mesh).lower(state, placed, key).compile()
        distributed.barrier("compiled")
        _, metrics = step(state, placed, key)
        out["meshes"][str(shape)] = {
            **{name: float(np.asarray(metrics[name])) for name in ("loss", "loss_diff", "loss_mlm", "grad_norm")},
            # Checked on every process; process 0 reports whether all of them hold the right rows.
            "rows_in_place": not distributed.any_process(not rows_in_place(batch, placed)),
            "specs": {name: str(array.sharding.spec) for name, array in placed.items()},
            "local_rows": {name: local_rows(array) for name, array in placed.items()},
        }
    if distributed.is_primary():
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
