"""A training run that checkpoints and resumes: customization and contextualizer pretraining share it.

The state is any flax struct with ``step``, ``params`` (what trains), ``opt_state`` and ``frozen``
(referenced, never checkpointed). A fresh run starts at step 0; a workdir with checkpoints continues
from the latest, after checking that it holds the same run (``workdir.check_same_run``), with the
batch iterator and the run's key restored, so the rest of the run is bitwise what an uninterrupted run
would have done. SIGTERM saves and returns early (``LoopEnd.preempted``).
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Callable, Iterator

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
    # Replicated on the mesh like every argument of the compiled step, which takes no other placement.
    rng = sharding.replicate_key(jax.random.key(seed), mesh)
    batches = pipeline.batch_iterator(make_batch, place=lambda batch: sharding.shard_batch(batch, mesh))
    # Fresh and restored states both live in the mesh's shardings (the restore reads straight into
    # them), so a resumed run reuses the executable of an uninterrupted one.
    given, state = state, sharding.shard_state(state, mesh)
    step = checkpointer.latest_step()
    if step is None:
        if os.path.exists(os.path.join(workdir, loop_lib.METRICS_FILE)):
            loop_lib.truncate_metrics(workdir, 0)  # stopped before its first checkpoint: start over
        return state, 0, rng, batches
    workdir_lib.check_same_run(checkpointer.read_run(step), run_identity, f"{checkpointer.directory}/{step}")
    # The fresh parameters and optimizer state are freed before the restore, which reads into their
    # shapes and shardings: holding both would double their memory (3× the trained weights for AdamW)
    # at the moment a resumed DreamBooth run is most likely to run out. The state is the run's to
    # consume anyway: the compiled step donates it.
    params, opt_state = checkpoint_lib.abstract(state.params), checkpoint_lib.abstract(state.opt_state)
    for leaf in jax.tree.leaves((given.params, given.opt_state, state.params, state.opt_state)):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()
    restored = checkpointer.restore(step, params=params, opt_state=opt_state)
    state = sharding.shard_state(state.replace(step=jnp.asarray(step, jnp.int32), params=restored["params"],
                                               opt_state=restored["opt_state"]), mesh)
    pipeline.restore(batches, restored["data"], step)
    loop_lib.truncate_metrics(workdir, step)
    print(f"resuming {workdir} from its checkpoint at step {step}", file=sys.stderr, flush=True)
    return state, step, sharding.replicate_key(restored["rng"], mesh), batches


def _compile(step_fn: Callable, state: Any, batches: Iterator[dict], rng: jax.Array, mesh: jax.sharding.Mesh,
             finished: bool) -> tuple[Callable, Iterator[dict]]:
    """The step compiled ahead of time for the first batch's shapes and shardings, with its compile
    time, FLOPs and memory on one stderr line, and the batches with that first one put back.

    A run in the same process with the same shapes (a resume) gets the same executable back
    (:meth:`sharding.StepFunction.compile`). A finished run compiles nothing.
    """
    jitted = sharding.jit_step(step_fn, state, mesh)
    if finished:
        return jitted, batches
    first = next(batches)
    reused = jitted.has_compiled(state, first, rng)
    compiled = jitted.compile(state, first, rng)
    print(f"train step on {sharding.describe_mesh(mesh)}: {'reusing the executable ' if reused else ''}"
          f"{compiled.describe()}", file=sys.stderr, flush=True)
    return compiled, itertools.chain([first], batches)


def run(step_fn: Callable[[Any, dict, jax.Array], tuple[Any, dict]], state: Any, make_batch: Callable[[int], dict],
        *, workdir: str, run_identity: dict, seed: int, max_steps: int, log_every: int, checkpoint_every: int,
        keep: int, description: str, mesh: jax.sharding.Mesh | None = None) -> loop_lib.LoopEnd:
    """Runs (or resumes) ``step_fn`` to ``max_steps`` in ``workdir``, which must already hold ``run.json``.

    ``state`` is consumed: its trained parameters and optimizer state are donated to the first step,
    or freed before a checkpoint is restored; use the returned ``LoopEnd.state``.

    ``step_fn`` is the pure step, jitted here (state donated, on ``mesh``: default all devices
    data-parallel) and compiled ahead of time on the first batch; the compile time, FLOPs and
    per-device memory go to stderr as one ``train step: ...`` line. Saves every ``checkpoint_every``
    steps (0: only at the end), at the end and on SIGTERM.
    """
    mesh = mesh or sharding.make_mesh(sharding.DATA_PARALLEL)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=keep)
    try:
        state, start_step, rng, batches = _start_or_resume(state, make_batch, checkpointer, run_identity, workdir,
                                                           seed, mesh)
        # The loop reads `stream`; `batches` (the same iterator) is what checkpoints record the position of.
        compiled, stream = _compile(step_fn, state, batches, rng, mesh, start_step >= max_steps)

        def save(step: int, state: Any) -> None:
            checkpointer.save(step, params=state.params, opt_state=state.opt_state, rng=rng,
                              data=batches.get_state(), run=run_identity)

        with loop_lib.preemption_guard() as preempted:
            end = loop_lib.train_loop(compiled, state, stream, rng, max_steps=max_steps, workdir=workdir,
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
