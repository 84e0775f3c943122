"""Multi-host training: one Python process per host (or per GPU), joined by ``jax.distributed``.

The contract, for ``python -m mlmjax.train --distributed`` on every host:

* **Who initialises.** ``train.main`` calls :func:`initialize` first thing, before anything touches a
  device: with ``--coordinator_address host:port --num_processes N --process_id i`` on machines of your
  own, or with none of the three on a TPU pod, under SLURM or Open MPI, where ``jax.distributed``
  finds them itself. Nothing else (reading a config, importing a module) initialises. On CPU the
  processes exchange collectives over gloo (TCP).
* **What each process feeds.** Every process computes the same global batch from (seed, step) on its
  host (cheap: the images are cached VAE moments) and hands :func:`jax.make_array_from_process_local_data`
  only the rows its own devices hold (``sharding.process_rows``, the one rule). A batch whose rows
  divide the mesh's ``data × fsdp`` ways is split; one that does not (the paper's MLM batch of 25) is
  replicated, so every process supplies all of it.
* **Who writes what.** Process 0 alone (:func:`is_primary`) writes ``config.json``/``run.json``,
  ``metrics.jsonl``, TensorBoard files, ``loss_curve.png`` and shows the progress bar. Checkpoints
  are written by all processes together (orbax: each writes the shards it holds, process 0 the
  metadata), and a resume restores on all of them; the workdir must therefore be one folder that all
  hosts see (a shared file system: NFS, Filestore, a FUSE-mounted bucket; mlmjax writes the workdir with plain
  file calls, so a ``gs://`` URL is not accepted). The metrics every process logs are the same
  replicated values, so every process checks them for NaN and stops at the same step, and a SIGTERM
  seen by any process stops all of them at the same step (:func:`any_process`).
* End-of-run samples and generated class images are sampled by all processes together (each over
  its own devices, ``sharding.put`` feeding each only its shards) and written by process 0.
"""

from __future__ import annotations

import os

import jax
import numpy as np

# Environment variables by which jax.distributed recognises a cluster that names the processes itself.
_MANAGED_ENV = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID",
                "MEGASCALE_COORDINATOR_ADDRESS")


def _managed_cluster() -> bool:
    """Whether ``jax.distributed.initialize()`` can fill in missing values here (SLURM, Open MPI, TPU)."""
    if any(name in os.environ for name in _MANAGED_ENV):
        return True
    try:
        from jax._src.clusters import cloud_tpu_cluster
        return bool(cloud_tpu_cluster.running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):  # pragma: no cover - a jax without that module
        return False


def check_flags(distributed: bool, coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Raises ``ValueError`` (one line, naming the flag) for a combination that cannot start.

    ``coordinator_address`` "" , ``num_processes`` 0 and ``process_id`` -1 mean "detect" (TPU pod,
    SLURM, Open MPI). Given by hand, all three are needed, except where such a cluster is detected.
    """
    given = {"--coordinator_address": bool(coordinator_address), "--num_processes": num_processes != 0,
             "--process_id": process_id != -1}
    if not distributed:
        named = [flag for flag, present in given.items() if present]
        if named:
            raise ValueError(f"{named[0]} needs --distributed")
        return
    if num_processes < 0:
        raise ValueError(f"--num_processes={num_processes}: give a positive count, or 0 to detect it")
    if process_id < -1:
        raise ValueError(f"--process_id={process_id}: give 0 .. num_processes-1, or -1 to detect it")
    if num_processes and process_id >= num_processes:
        raise ValueError(f"--process_id={process_id} is not below --num_processes={num_processes}")
    if coordinator_address and (coordinator_address.startswith(":") or ":" not in coordinator_address):
        raise ValueError(f"--coordinator_address={coordinator_address!r}: expected host:port, e.g. 10.0.0.2:1234")
    if any(given.values()) and not all(given.values()) and not _managed_cluster():
        missing = next(flag for flag, present in given.items() if not present)
        raise ValueError(f"{missing} is missing: outside a TPU pod, SLURM or Open MPI job, give "
                         "--coordinator_address, --num_processes and --process_id together (or none of them "
                         "where the cluster names them)")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               initialization_timeout: int = 300) -> None:
    """``jax.distributed.initialize`` with this command's flags (see :func:`check_flags`), CPU
    collectives over gloo; then prints ``process i/n, local devices k, global devices m``.

    Must run before any device is touched (a computation, ``jax.devices()``); call it once per process.
    """
    check_flags(True, coordinator_address, num_processes, process_id)
    if jax.config.jax_cpu_collectives_implementation not in ("gloo", "mpi", "megascale"):
        # Without a CPU collectives implementation a CPU computation over several processes fails.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address or None,
                                   num_processes=num_processes or None,
                                   process_id=None if process_id == -1 else process_id,
                                   initialization_timeout=initialization_timeout)
    except ValueError as error:  # jax's own, e.g. no cluster detected and no address given
        raise ValueError(f"--distributed: {' '.join(str(error).split())}; pass --coordinator_address, "
                         "--num_processes and --process_id outside a TPU pod, SLURM or Open MPI job") from None
    print(describe(), flush=True)


def describe() -> str:
    """``process i/n, local devices k, global devices m``: one line a person can check per host."""
    return (f"process {jax.process_index()}/{jax.process_count()}, local devices {jax.local_device_count()}, "
            f"global devices {jax.device_count()}")


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true on one process)."""
    return jax.process_index() == 0


_BARRIERS = [0]  # barriers passed so far: every process passes the same ones in the same order


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op on one process).

    A host-side barrier of the coordination service, not a device collective: it waits as long as
    ``timeout_s`` for a process that is still compiling or reading, where a first collective over
    gloo gives up after 30 s (``Gloo context initialization failed``). Put one before the first
    computation that follows work whose length differs between processes (a compile that one
    process finds in its cache and another does not).
    """
    if jax.process_count() == 1:
        return
    _BARRIERS[0] += 1
    from jax._src import distributed as jax_distributed  # the client orbax's barriers use too

    client = jax_distributed.global_state.client
    if client is None:  # pragma: no cover - several processes without jax.distributed (not a case here)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"mlmjax:{name}:{_BARRIERS[0]}", timeout_in_ms=timeout_s * 1000)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process; every process gets the same answer (collective: all
    processes must call it together). On one process, ``flag``."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))
