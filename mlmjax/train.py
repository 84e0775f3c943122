r"""Customize Stable Diffusion with one of four baselines, with or without MLM; or pretrain the contextualizer.

    python -m mlmjax.train --config configs/ti.py --workdir /tmp/ti
    python -m mlmjax.train --config configs/ti.py --workdir /tmp/ti-plain --config.mlm.weight=0
    python -m mlmjax.train --config configs/contextualizer.py:tiny --workdir /tmp/ctx

On several hosts, the same command on each with ``--distributed`` (see :mod:`mlmjax.distributed`)::

    python -m mlmjax.train --config configs/ti.py --workdir /shared/ti --distributed \
        --coordinator_address 10.0.0.2:1234 --num_processes 2 --process_id 0   # 1 on the other host

With ``pretrained``, ``concept.images`` and ``mlm.contextualizer`` left empty, the run uses the
embedded tiny default (``mlmjax/assets/tiny``): a small SD-shaped model trained on the miniature world
(``mlmjax.world``), its contextualizer, and 5 photos of the world's novel teapot. The workdir receives ``config.json``, ``metrics.jsonl`` and, at the
end, ``samples/`` with PNGs of a few context prompts.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import ml_collections
import numpy as np
from ml_collections import config_flags

from mlmjax import class_images as class_images_lib
from mlmjax import config as config_lib
from mlmjax import data as data_lib
from mlmjax import distributed
from mlmjax import loop as loop_lib
from mlmjax import method as method_lib
from mlmjax import pretrain_contextualizer
from mlmjax import pretrained as pretrained_lib
from mlmjax import resumable
from mlmjax import runtime
from mlmjax import sharding
from mlmjax import sample as sample_lib
from mlmjax import tiny
from mlmjax import train_step as train_step_lib
from mlmjax import trainable
from mlmjax import workdir as workdir_lib


CLASS_IMAGES_DIR = "class_images"



def _resolve_embedded(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills the empty data fields with the embedded tiny default's (only if pretrained is empty too)."""
    config = ml_collections.ConfigDict(config.to_dict())
    # Resolved (and so recorded in config.json) before the embedded photos fill concept.images.
    config.concept.family = config_lib.concept_family(config)
    if not config.pretrained:
        embedded = tiny.embedded_assets()
        config.pretrained = embedded.model
        config.concept.images = config.concept.images or embedded.concept_images
        config.concept.class_noun = config.concept.class_noun or embedded.class_noun
        config.mlm.contextualizer = config.mlm.contextualizer or embedded.contextualizer
        config.prior.images = config.prior.images or embedded.class_images
    return config


def _write_samples(model: pretrained_lib.Pretrained, state: train_step_lib.TrainState, built: method_lib.MethodState,
                   config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
    """One image per ``sample_prompts`` entry with the learned concept, in ``workdir/samples/step_<K>``
    (what ``python -m mlmjax.sample`` writes; skipped if that folder exists, e.g. a finished run rerun)."""
    out = os.path.join(workdir, "samples", f"step_{step}")
    # Every process sees the same answer: process 0 cannot write before all have entered the sampling.
    if os.path.exists(out):
        return
    run = workdir_lib.TrainedRun(workdir=workdir, step=step, config=config, model=model, spec=state.spec,
                                 params=trainable.merge(state.params, state.frozen), trained=state.params,
                                 concept_tokens=built.concept_tokens, concept_phrase=built.concept_phrase)
    sample_lib.sample_run(run, list(config.sample_prompts), out=out, num_images=1, scheduler="ddim",
                          steps=config.sample_steps, guidance=7.5, seed=config.seed)


def _read_inputs(config: ml_collections.ConfigDict) -> tuple[pretrained_lib.Pretrained, np.ndarray]:
    """The base model and the concept photos; every user error here comes before anything is written."""
    model = pretrained_lib.load_pretrained(config.pretrained)
    if not config.concept.images:
        raise ValueError("config.concept.images is empty; point it at a folder of photos of the concept "
                         "(or a TFDS concept, tfds:NAME/CONCEPT@DATA_DIR)")
    if not config.concept.class_noun:
        raise ValueError("config.concept.class_noun is empty; name the concept's class, e.g. 'dog'")
    if config.mlm.weight and not config.mlm.contextualizer:
        raise ValueError("config.mlm.weight > 0 needs config.mlm.contextualizer (a contextualizer folder)")
    config.resolution = config.resolution or model.resolution
    return model, data_lib.load_images(config.concept.images, config.resolution)


def _class_images(config: ml_collections.ConfigDict, model: pretrained_lib.Pretrained, workdir: str,
                  model_hash: str) -> np.ndarray | None:
    """The prior-preservation images: the configured folder, or generated once into the workdir (by
    every process together in a multi-process run; process 0 writes them)."""
    if not config.prior.weight:
        return None
    folder = config.prior.images or class_images_lib.ensure_class_images(
        model, os.path.join(workdir, CLASS_IMAGES_DIR), prompt=config.prior.prompt.format(config.concept.class_noun),
        count=config.prior.num_images, resolution=config.resolution, seed=config.seed, model_fingerprint=model_hash)
    return data_lib.load_images(folder, config.resolution)[: config.prior.num_images]


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs, or resumes, the customization described by ``config`` in ``workdir``.

    A new (or empty) workdir starts the run; a workdir holding the same run (same config but for
    :data:`mlmjax.workdir.RESUMABLE` fields, same input contents) continues from its latest
    checkpoint, bit for bit as if it had never stopped; any other workdir is refused. SIGTERM saves
    a checkpoint and returns. Returns the last logged metrics.
    """
    config_lib.validate(config)
    runtime.check_cpu_devices(int(config.mesh.get("cpu_devices", 0)))
    mesh = sharding.make_mesh(config.mesh)  # a mesh that does not fit the devices is a user error too
    config = _resolve_embedded(config)
    model, concept_images = _read_inputs(config)
    hashes = workdir_lib.fingerprints(config)
    run_identity = workdir_lib.identity(config, hashes)
    saved = workdir_lib.read_identity(workdir)
    if saved is not None:
        workdir_lib.check_same_run(saved, run_identity, workdir)
    built = method_lib.build_state(config, model, contextualizer_folder=config.mlm.contextualizer or None, mesh=mesh)
    # Every user error is behind us: from here on the workdir is written (by process 0; the others
    # wait until every process has read the workdir above and until process 0 has written it).
    distributed.barrier("mlmjax.train: workdir read")
    if distributed.is_primary():
        workdir_lib.write_run_files(workdir, config, run_identity)
    distributed.barrier("mlmjax.train: run files written")
    make_batch = method_lib.batch_function(config, model, built, concept_images=concept_images,
                                           class_images=_class_images(config, model, workdir, hashes["pretrained"]))
    end = resumable.run(train_step_lib.train_step, built.state, make_batch, workdir=workdir,
                        run_identity=run_identity, seed=config.seed, max_steps=config.max_steps,
                        log_every=config.log_every, checkpoint_every=config.checkpoint.every,
                        keep=config.checkpoint.keep, description=config.method,
                        mesh=mesh)
    if config.sample_prompts and not end.preempted:
        _write_samples(model, end.state, built, config, workdir, end.step)  # all processes sample, 0 writes
    return end.metrics or loop_lib.read_metrics(workdir)[-1]


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing this module defines none."""
    config_flags.DEFINE_config_file("config", None, "a method config, e.g. configs/ti.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "where config, metrics, checkpoints and samples are written")
    flags.DEFINE_bool("distributed", False, "one process of a multi-host run: jax.distributed.initialize() before "
                      "anything else; the workdir must be one folder every host sees")
    flags.DEFINE_string("coordinator_address", "", "with --distributed: host:port of process 0; empty: detected "
                        "(TPU pod, SLURM, Open MPI)")
    flags.DEFINE_integer("num_processes", 0, "with --distributed: how many processes; 0: detected")
    flags.DEFINE_integer("process_id", -1, "with --distributed: this process's index, 0 .. num_processes-1; "
                         "-1: detected")


def _start_distributed(values: flags.FlagValues) -> None:
    """``--distributed``: join the other processes before anything touches a device (else check that
    no process flag was given without it)."""
    distributed.check_flags(values.distributed, values.coordinator_address, values.num_processes,
                            values.process_id)
    if values.distributed and values.config.get("method") == "contextualizer":
        raise ValueError("--distributed: contextualizer pretraining runs in one process; drop --distributed")
    if values.distributed:
        distributed.initialize(values.coordinator_address, values.num_processes, values.process_id)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    runtime.start_command()
    try:
        runtime.split_cpu(int(config.mesh.get("cpu_devices", 0)))  # before JAX starts its backends
        _start_distributed(flags.FLAGS)
        if config.get("method") == "contextualizer":
            pretrain_contextualizer.run(config, workdir)
        else:
            metrics = train(config, workdir)
            print(json.dumps(metrics))
    except (ValueError, OSError, loop_lib.NonFiniteLossError) as error:
        # User errors (bad paths, values, files) get one line and a non-zero exit, no traceback.
        runtime.fail(str(error))


if __name__ == "__main__":
    runtime.relaunch_with_huge_pages()
    define_flags()
    app.run(main, flags_parser=runtime.parse_flags)
