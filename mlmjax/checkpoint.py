"""Checkpoints of a training run, with orbax: save every N steps (async), keep the last K, restore.

A checkpoint holds what the run cannot recompute: the trainable parameters, the optimizer state, the
step, the run's random key, the batch iterator's state and the run's identity (the config and the
content hashes of the base model and the images, see ``workdir.py``). Frozen weights are *not*
copied: they are the base model's, which the identity names and resume checks. A Textual Inversion
checkpoint is therefore a few kilobytes; a DreamBooth one holds what DreamBooth trains.

Items (orbax ``Composite``)::

    params     trainable parameters        (StandardSave: restored straight into their shardings)
    opt_state  optimizer state             (idem)
    rng        the run's jax random key    (JSON: implementation and key data)
    data       batch-iterator state        (JSON, e.g. {"next_index": 1200})
    run        {"config": ..., "fingerprints": ...}  (JSON)

orbax writes each checkpoint into a temporary folder and renames it when complete, so a save cut off
by SIGKILL leaves the previous checkpoints restorable (``latest_step`` never sees the partial one).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
_ITEMS = ("params", "opt_state", "rng", "data", "run")


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into this run; the message says why."""


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of ``tree``: what :meth:`Checkpointer.restore` reads into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """The checkpoints of one workdir (``workdir/checkpoints/<step>/``)."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, *, params: Any, opt_state: Any, rng: jax.Array, data: dict, run: dict) -> None:
        """Starts saving (returns before the files are written when async); see :meth:`wait`."""
        self._manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            rng=ocp.args.JsonSave(_key_to_json(rng)), data=ocp.args.JsonSave(data), run=ocp.args.JsonSave(run)))

    def read_run(self, step: int) -> dict:
        """The identity saved with checkpoint ``step``."""
        return self._manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore())).run

    def restore(self, step: int, *, params: Any, opt_state: Any | None = None) -> dict:
        """Checkpoint ``step`` restored into the shapes, dtypes and shardings of the given trees
        (arrays or their :func:`abstract` form).

        ``opt_state`` None skips the optimizer state (inference and export). Returns a dict with
        ``params``, ``opt_state`` (when asked), ``rng``, ``data`` and ``run``.
        """
        args = {"params": ocp.args.StandardRestore(abstract(params)), "rng": ocp.args.JsonRestore(),
                "data": ocp.args.JsonRestore(), "run": ocp.args.JsonRestore()}
        if opt_state is not None:
            args["opt_state"] = ocp.args.StandardRestore(abstract(opt_state))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{self.directory}/{step}: does not fit this run's parameters ({_first_line(error)}); "
                "it was written by another model or config: use a new workdir") from None
        out = {name: restored[name] for name in args}
        out["rng"] = _key_from_json(out["rng"])
        return out

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _key_to_json(key: jax.Array) -> dict:
    return {"impl": str(jax.random.key_impl(key)), "data": jax.device_get(jax.random.key_data(key)).tolist()}


def _key_from_json(saved: dict) -> jax.Array:
    return jax.random.wrap_key_data(jax.numpy.asarray(saved["data"], jax.numpy.uint32), impl=saved["impl"])


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
