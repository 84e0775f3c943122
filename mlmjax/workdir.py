"""A run's workdir: what identifies the run, and the trained model read back from its checkpoints.

A workdir holds ``config.json`` (the resolved config), ``run.json`` (content hashes of the base model
and the training images: what makes two runs "the same run"), ``metrics.jsonl``, ``checkpoints/``
(orbax) and whatever the run wrote (``samples/``, ``class_images/``). Re-running the same command on
the same workdir resumes it; changing anything but the fields in :data:`RESUMABLE` is another run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import ml_collections

from mlmjax import checkpoint as checkpoint_lib
from mlmjax import config as config_lib
from mlmjax import data as data_lib
from mlmjax import files
from mlmjax import method as method_lib
from mlmjax import pretrained as pretrained_lib
from mlmjax import trainable
from mlmjax.pretrained import Pretrained
from mlmjax.train_step import StepSpec

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"

# Config fields a resumed run may change: lengths, intervals, what happens after training, and how the
# step is laid out (mesh sizes, remat: they change float rounding only, and a run that ran out of memory
# should be able to go on with remat on or over more devices).
# Paths may change too (a moved model or photo folder) as long as the content hashes agree.
RESUMABLE = ("max_steps", "log_every", "checkpoint.every", "checkpoint.keep", "sample_steps", "sample_prompts",
             "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.cpu_devices", "remat",
             "pretrained", "concept.images", "prior.images", "mlm.contextualizer", "captions")

# What a diffusers-layout folder holds that the model is made of (a safety checker or a pickled
# copy beside it does not count).
_MODEL_PARTS = ("model_index.json", "text_encoder", "tokenizer", "unet", "vae", "scheduler")
_MODEL_SUFFIXES = (".json", ".safetensors", ".txt")


class AnotherRunError(ValueError):
    """The workdir holds a run that differs from the one asked for; the message names the difference."""


@dataclasses.dataclass
class TrainedRun:
    """A customized model read back from a workdir (what ``sample`` and ``export`` work on).

    Attributes:
      workdir: the run's folder.
      step: the checkpoint's step.
      config: the run's resolved config (``config.json``).
      model: the base model; its tokenizer has the concept tokens added.
      spec: the step spec (MLM branch off), what :func:`mlmjax.sampling.generate` takes.
      params: the merged parameter tree (``text_encoder``, ``unet``, ``concept``) with the trained
        values in place.
      trained: the trainable subtree alone, as the checkpoint holds it.
      concept_tokens: the new tokens' names, ``<token>`` then, for XTI, ``<token>_1`` ...
      concept_phrase: what prompts put in their ``{}`` slot, e.g. ``"<token> teapot"``.
    """
    workdir: str
    step: int
    config: ml_collections.ConfigDict
    model: Pretrained
    spec: StepSpec
    params: dict
    trained: dict
    concept_tokens: list[str]
    concept_phrase: str


def _hash_files(root: str, paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(folder: str) -> str:
    """sha256 over the config, tokenizer and weight files of a diffusers-layout folder."""
    paths = []
    for part in _MODEL_PARTS:
        path = os.path.join(folder, part)
        if os.path.isfile(path):
            paths.append(path)
        elif os.path.isdir(path):
            paths += [os.path.join(path, name) for name in os.listdir(path) if name.endswith(_MODEL_SUFFIXES)]
    return _hash_files(folder, paths)


def file_fingerprint(path: str) -> str:
    """sha256 of one file (a caption list)."""
    return _hash_files(os.path.dirname(path), [path])


def folder_fingerprint(folder: str) -> str:
    """sha256 over every file of a folder (a contextualizer)."""
    return _hash_files(folder, [os.path.join(folder, name) for name in os.listdir(folder)
                                if os.path.isfile(os.path.join(folder, name))])


def fingerprints(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Content hashes of what a run reads besides its config: base model, photos, contextualizer."""
    out = {"pretrained": model_fingerprint(config.pretrained),
           "concept.images": data_lib.fingerprint(config.concept.images)}
    if config.prior.weight and config.prior.images:
        out["prior.images"] = data_lib.fingerprint(config.prior.images)
    if config.mlm.weight:
        out["mlm.contextualizer"] = folder_fingerprint(config.mlm.contextualizer)
    return out


def identity(config: ml_collections.ConfigDict, hashes: dict[str, str]) -> dict:
    """What makes a run itself: the config (as JSON) and the content hashes of its inputs."""
    return {"config": json.loads(config.to_json()), "fingerprints": hashes}


def check_same_run(saved: dict, current: dict, where: str) -> None:
    """Raises :class:`AnotherRunError` naming what differs between two identities (see :data:`RESUMABLE`)."""
    old, new = config_lib.flatten_config(saved["config"]), config_lib.flatten_config(current["config"])
    changed = [f"config.{key}: {old.get(key)!r} there, {new.get(key)!r} now" for key in sorted(set(old) | set(new))
               if key not in RESUMABLE and old.get(key) != new.get(key)]
    for key in sorted(set(saved["fingerprints"]) | set(current["fingerprints"])):
        if saved["fingerprints"].get(key) != current["fingerprints"].get(key):
            changed.append(f"the content of config.{key} ({new.get(key)!r}) differs from what it was trained on")
    if changed:
        more = f" (and {len(changed) - 2} more)" if len(changed) > 2 else ""
        raise AnotherRunError(f"{where} holds another run: {'; '.join(changed[:2])}{more}; use a new --workdir, "
                              "or the original settings to resume")


def read_identity(workdir: str) -> dict | None:
    """The identity of the run in ``workdir`` (``run.json``), or None for a new or empty folder.

    A non-empty folder that is not an mlmjax run is refused rather than written into.
    """
    path = os.path.join(workdir, RUN_FILE)
    if os.path.isfile(path):
        return files.read_json_object(path, AnotherRunError, "the workdir is damaged; use a new --workdir")
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise AnotherRunError(f"{workdir}: is not empty and holds no mlmjax run ({RUN_FILE}); use a new --workdir")
    return None


def write_run_files(workdir: str, config: ml_collections.ConfigDict, run_identity: dict) -> None:
    """``config.json`` (the config as resolved now) and ``run.json``, each written atomically."""
    os.makedirs(workdir, exist_ok=True)
    files.write_text_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2, sort_keys=True) + "\n")
    files.write_json_atomic(os.path.join(workdir, RUN_FILE), run_identity)


def load_trained(workdir: str, step: int | None = None) -> TrainedRun:
    """The model customized by the run in ``workdir``, at checkpoint ``step`` (default the latest).

    The base model is read from the ``pretrained`` path of the run's latest command (``run.json``)
    and must be the one the checkpoint was trained from (content hash); only the trained parameters
    come from the checkpoint.
    """
    if not os.path.isfile(os.path.join(workdir, RUN_FILE)):
        raise FileNotFoundError(f"{workdir}: not an mlmjax run (no {RUN_FILE}); pass the --workdir of a training run")
    checkpointer = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir}: has no checkpoint yet; train longer or wait for the first save")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; it has {steps}")
        saved = checkpointer.read_run(step)
        # Paths as the run's latest command gave them (a model may have moved since the save).
        config = ml_collections.ConfigDict(read_identity(workdir)["config"])
        if model_fingerprint(config.pretrained) != saved["fingerprints"]["pretrained"]:
            raise checkpoint_lib.CheckpointError(
                f"{config.pretrained}: is not the base model the run in {workdir} was trained from (its content "
                "differs); restore the original folder")
        model = pretrained_lib.load_pretrained(config.pretrained)
        inference = ml_collections.ConfigDict(config.to_dict())
        inference.mlm.weight = 0.0  # the MLM branch holds no trained parameters
        built = method_lib.build_state(inference, model, contextualizer_folder=None)
        trained = checkpointer.restore(step, params=built.state.params)["params"]
    finally:
        checkpointer.close()
    return TrainedRun(workdir=workdir, step=step, config=config, model=model, spec=built.state.spec,
                      params=trainable.merge(trained, built.state.frozen), trained=trained,
                      concept_tokens=built.concept_tokens, concept_phrase=built.concept_phrase)
