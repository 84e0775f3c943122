"""A training run that checkpoints and resumes: customization and contextualizer pretraining share it.

The state is any flax struct with ``step``, ``params`` (what trains), ``opt_state`` and ``frozen``
(referenced, never checkpointed). A fresh run starts at step 0; a workdir with checkpoints continues
from the latest, after checking that it holds the same run (``workdir.check_same_run``), with the
batch iterator and the run's key restored, so the rest of the run is bitwise what an uninterrupted run
would have done. SIGTERM saves and returns early (``LoopEnd.preempted``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mlmjax import checkpoint as checkpoint_lib
from mlmjax import loop as loop_lib
from mlmjax import pipeline
from mlmjax import sharding
from mlmjax import workdir as workdir_lib


def _start_or_resume(state: Any, make_batch: Callable[[int], dict], checkpointer: checkpoint_lib.Checkpointer,
                     run_identity: dict, workdir: str, seed: int, mesh: jax.sharding.Mesh):
    """(state, start step, run key, batch iterator): fresh, or restored from the latest checkpoint."""
    rng = jax.random.key(seed)
    batches = pipeline.batch_iterator(make_batch, process_index=jax.process_index(),
                                      process_count=jax.process_count(),
                                      place=lambda batch: sharding.shard_batch(batch, mesh))
    # Fresh and restored states both live in the mesh's shardings (the restore reads straight into
    # them), so a resumed run reuses the executable of an uninterrupted one.
    state = sharding.shard_state(state, mesh)
    step = checkpointer.latest_step()
    if step is None:
        if os.path.exists(os.path.join(workdir, loop_lib.METRICS_FILE)):
            loop_lib.truncate_metrics(workdir, 0)  # stopped before its first checkpoint: start over
        return state, 0, rng, batches
    workdir_lib.check_same_run(checkpointer.read_run(step), run_identity, f"{checkpointer.directory}/{step}")
    restored = checkpointer.restore(step, params=state.params, opt_state=state.opt_state)
    state = sharding.shard_state(state.replace(step=jnp.asarray(step, jnp.int32), params=restored["params"],
                                               opt_state=restored["opt_state"]), mesh)
    pipeline.restore(batches, restored["data"], step)
    loop_lib.truncate_metrics(workdir, step)
    print(f"resuming {workdir} from its checkpoint at step {step}", file=sys.stderr, flush=True)
    return state, step, restored["rng"], batches


def run(step_fn: Callable[[Any, dict, jax.Array], tuple[Any, dict]], state: Any, make_batch: Callable[[int], dict],
        *, workdir: str, run_identity: dict, seed: int, max_steps: int, log_every: int, checkpoint_every: int,
        keep: int, description: str, mesh: jax.sharding.Mesh | None = None) -> loop_lib.LoopEnd:
    """Runs (or resumes) ``step_fn`` to ``max_steps`` in ``workdir``, which must already hold ``run.json``.

    ``step_fn`` is the pure step (jitted here, state donated, on ``mesh``: default all devices
    data-parallel). Saves every ``checkpoint_every`` steps (0: only at the end), at the end and on SIGTERM.
    """
    mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=keep)
    try:
        state, start_step, rng, batches = _start_or_resume(state, make_batch, checkpointer, run_identity, workdir,
                                                           seed, mesh)
        step_fn = sharding.jit_step(step_fn, state, mesh)

        def save(step: int, state: Any) -> None:
            checkpointer.save(step, params=state.params, opt_state=state.opt_state, rng=rng,
                              data=batches.get_state(), run=run_identity)

        with loop_lib.preemption_guard() as preempted:
            end = loop_lib.train_loop(step_fn, state, batches, rng, max_steps=max_steps, workdir=workdir,
                                      log_every=log_every, start_step=start_step, description=description,
                                      save=save, save_every=checkpoint_every, stop=preempted,
                                      last_saved_step=checkpointer.latest_step())
        checkpointer.wait()
    finally:
        checkpointer.close()
    if end.preempted:
        print(f"stopped by SIGTERM after step {end.step}; checkpoint saved; run the same command to resume",
              file=sys.stderr, flush=True)
    return end
