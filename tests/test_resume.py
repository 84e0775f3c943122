"""Checkpoints and resume: bitwise equal to an uninterrupted run, SIGTERM, SIGKILL during a save,
refusal of another run or another base model, and a diverged loss that keeps the last good checkpoint.

The in-process runs share one compiled train step (same spec), so the whole file compiles it once
here and once per subprocess.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlmjax import checkpoint as checkpoint_lib
from mlmjax import loop
from mlmjax import pretrained as pretrained_lib
from mlmjax import resumable
from mlmjax import sharding
from mlmjax import tiny
from mlmjax import train as train_lib
from mlmjax import train_step as train_step_lib
from mlmjax import workdir as workdir_lib
from test_train_step import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def ti_config(max_steps: int, **changes):
    """TI with MLM on the embedded default; a checkpoint every 2 steps, metrics every step."""
    config = load_config("ti")
    config.concept.token, config.concept.class_noun = "<concept>", ""  # the embedded default's
    config.max_steps, config.log_every, config.checkpoint.every = max_steps, 1, 2
    config.sample_prompts = ()
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


def trained(workdir: str, step: int | None = None) -> np.ndarray:
    return np.asarray(workdir_lib.load_trained(workdir, step).trained["concept"]["embeddings"])


def snapshot(folder) -> dict[str, bytes]:
    """Every file's bytes under ``folder``: to prove a refused command changed nothing."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    train_lib.train(ti_config(STEPS), workdir)
    return workdir


def _compiled_train_steps() -> int:
    """Executables of the train step compiled so far in this process (any test file's runs)."""
    return sum(jitted._cache_size() for key, jitted in sharding._JITTED.items()
               if key[0] is train_step_lib.train_step)


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(uninterrupted, tmp_path):
    rows = loop.read_metrics(uninterrupted)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert checkpoint_lib.Checkpointer(uninterrupted).all_steps() == [2, 4, 6]

    compiled = _compiled_train_steps()
    # Stopped at 3 (its final checkpoint), then max_steps raised: the run continues.
    workdir = str(tmp_path / "run")
    train_lib.train(ti_config(3), workdir)
    assert checkpoint_lib.Checkpointer(workdir).all_steps() == [2, 3]
    train_lib.train(ti_config(STEPS, log_every=2, **{"checkpoint.every": 3}), workdir)
    resumed = loop.read_metrics(workdir)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 6]  # log_every changed on resume
    assert resumed == [row for row in rows if row["step"] in (1, 2, 3, 4, 6)]
    np.testing.assert_array_equal(trained(workdir), trained(uninterrupted))

    # Killed after step 5, before step 6 was saved: metrics beyond checkpoint 4 are re-logged.
    killed = str(tmp_path / "killed")
    shutil.copytree(uninterrupted, killed)
    shutil.rmtree(os.path.join(killed, "checkpoints", "6"))
    train_lib.train(ti_config(STEPS), killed)
    assert loop.read_metrics(killed) == rows
    np.testing.assert_array_equal(trained(killed), trained(uninterrupted))
    assert _compiled_train_steps() == compiled  # the resumed runs reused the first run's executable


class ToyState(flax.struct.PyTreeNode):
    """The least resumable.run trains: a parameter vector, Adam's state and nothing frozen."""
    step: jax.Array
    params: dict
    opt_state: object
    frozen: dict


def _toy_run(workdir: str, max_steps: int) -> tuple[ToyState, loop.LoopEnd]:
    tx = optax.adam(0.1)
    params = {"w": jnp.arange(4.0)}
    state = ToyState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), frozen={})

    def step_fn(state, batch, rng):
        grads = jax.grad(lambda p: jnp.sum((p["w"] - batch["x"]) ** 2))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {"loss": jnp.sum(params["w"])}

    identity = {"config": {"toy": 1}, "fingerprints": {}}
    if not os.path.exists(os.path.join(workdir, workdir_lib.RUN_FILE)):
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, workdir_lib.RUN_FILE), "w") as f:
            json.dump(identity, f)
    end = resumable.run(step_fn, state, lambda step: {"x": np.full(4, step, np.float32)}, workdir=workdir,
                        run_identity=identity, seed=0, max_steps=max_steps, log_every=1, checkpoint_every=2,
                        keep=2, description="toy")
    return state, end


def test_resume_frees_the_fresh_state_before_restoring_into_its_shardings(tmp_path):
    _, uninterrupted = _toy_run(str(tmp_path / "uninterrupted"), 4)
    _toy_run(str(tmp_path / "resumed"), 2)
    fresh, resumed = _toy_run(str(tmp_path / "resumed"), 4)
    # The passed state is consumed (freed before the restore, not held beside the restored copy).
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves((fresh.params, fresh.opt_state)))
    np.testing.assert_array_equal(resumed.state.params["w"], uninterrupted.state.params["w"])
    assert jax.tree.map(lambda x: x.sharding, resumed.state.params) == jax.tree.map(
        lambda x: x.sharding, uninterrupted.state.params)


def test_a_finished_run_rerun_does_nothing_and_load_trained_reads_any_step(uninterrupted):
    before = loop.read_metrics(uninterrupted)
    train_lib.train(ti_config(STEPS), uninterrupted)
    assert loop.read_metrics(uninterrupted) == before
    run = workdir_lib.load_trained(uninterrupted, step=4)
    assert run.step == 4 and run.concept_tokens == ["<concept>"] and run.concept_phrase == "<concept> teapot"
    assert not np.array_equal(trained(uninterrupted, 4), trained(uninterrupted, 6))
    np.testing.assert_array_equal(run.params["concept"]["embeddings"], run.trained["concept"]["embeddings"])
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 5; it has \\[2, 4, 6\\]"):
        workdir_lib.load_trained(uninterrupted, step=5)


@pytest.mark.parametrize("change, message", [
    ({"seed": 1}, "holds another run: config.seed: 7777 there, 1 now"),
    ({"mlm.weight": 0.0}, "config.mlm.weight: 1e-05 there, 0.0 now"),
    ({"learning_rate": 1e-3}, "config.learning_rate: 0.002 there, 0.001 now"),
])
def test_another_run_in_the_same_workdir_is_refused_and_nothing_changes(uninterrupted, change, message):
    before = snapshot(uninterrupted)
    with pytest.raises(workdir_lib.AnotherRunError, match=message.replace(".", "\\.")):
        train_lib.train(ti_config(STEPS, **change), uninterrupted)
    assert snapshot(uninterrupted) == before


def test_another_base_model_is_refused_on_resume_and_on_load(uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(uninterrupted, workdir)
    embedded = tiny.embedded_assets()
    inputs = {"concept.images": embedded.concept_images, "concept.class_noun": embedded.class_noun,
              "mlm.contextualizer": embedded.contextualizer}
    moved = str(tmp_path / "moved")  # the same model elsewhere: fine
    shutil.copytree(embedded.model, moved)
    train_lib.train(ti_config(STEPS, pretrained=moved, **inputs), workdir)
    other = str(tmp_path / "other")  # same shapes, other weights: another run
    pretrained_lib.save_pretrained(other, tiny.tiny_pretrained(seed=5))
    before = snapshot(workdir)
    with pytest.raises(workdir_lib.AnotherRunError, match="the content of config.pretrained .* differs"):
        train_lib.train(ti_config(STEPS + 2, pretrained=other, **inputs), workdir)
    assert snapshot(workdir) == before
    shutil.rmtree(moved)
    pretrained_lib.save_pretrained(moved, tiny.tiny_pretrained(seed=5))
    with pytest.raises(checkpoint_lib.CheckpointError, match="is not the base model the run .* was trained from"):
        workdir_lib.load_trained(workdir)


def test_a_non_empty_folder_that_is_no_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(workdir_lib.AnotherRunError, match="is not empty and holds no mlmjax run"):
        train_lib.train(ti_config(STEPS), str(tmp_path))
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_a_diverged_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """A step function whose loss turns NaN at step 5: checked at 6 (log every 3, save every 2), so
    checkpoints 2 and 4 stay and 6 is never written."""
    saved = []

    def step_fn(state, batch, rng):
        state = state + 1
        return state, {"loss": jnp.where(state >= 5, jnp.nan, 1.0), "grad_norm": jnp.float32(1)}

    batches = iter(lambda: {}, None)
    with pytest.raises(loop.NonFiniteLossError, 
                       match=r"loss is nan at step 6 \(finite at step 4, the previous check\); the last good checkpoint is step 4"):
        loop.train_loop(step_fn, jnp.int32(0), batches, jax.random.key(0), max_steps=10, workdir=str(tmp_path),
                        log_every=3, save=lambda step, state: saved.append((step, int(state))), save_every=2)
    assert saved == [(2, 2), (4, 4)]
    assert [row["step"] for row in loop.read_metrics(str(tmp_path))] == [1, 3]


def _run_train(workdir, *flags, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "mlmjax.train", "--config", "configs/ti.py", "--workdir", workdir,
         "--config.log_every=1", "--config.sample_prompts=()", *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_the_run_resumes(uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    process = _run_train(workdir, "--config.max_steps=100000", "--config.checkpoint.every=0")
    metrics = os.path.join(workdir, loop.METRICS_FILE)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    step = checkpoint_lib.Checkpointer(workdir).latest_step()
    assert step is not None and 2 <= step < 100000
    assert f"stopped by SIGTERM after step {step}; checkpoint saved" in stderr
    assert loop.read_metrics(workdir)[-1]["step"] == step
    if step < STEPS:  # continue to STEPS in this process and compare with the uninterrupted run
        train_lib.train(ti_config(STEPS, **{"checkpoint.every": 2}), workdir)
        assert loop.read_metrics(workdir) == loop.read_metrics(uninterrupted)
        np.testing.assert_array_equal(trained(workdir), trained(uninterrupted))


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def killed_while_saving_step_4(self):
        if "4" in (self._final_path.name, self._final_path.parent.name):
            os.kill(os.getpid(), signal.SIGKILL)  # the files of step 4 are half committed
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = killed_while_saving_step_4
    from absl import app
    from mlmjax import runtime, train
    sys.argv = ["train"] + sys.argv[1:]
    train.define_flags()
    app.run(train.main, flags_parser=runtime.parse_flags)
""")


def test_a_save_cut_off_by_sigkill_leaves_the_previous_checkpoint_restorable(uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-c", _KILL_DURING_SAVE, "--config", "configs/ti.py", "--workdir", workdir,
         "--config.log_every=1", "--config.sample_prompts=()", "--config.max_steps=6", "--config.checkpoint.every=2"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=400)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpoints = os.listdir(os.path.join(workdir, "checkpoints"))
    assert any(name.startswith("4.") and "tmp" in name for name in checkpoints), checkpoints  # the cut-off save
    assert checkpoint_lib.Checkpointer(workdir).latest_step() == 2
    train_lib.train(ti_config(STEPS), workdir)
    assert loop.read_metrics(workdir) == loop.read_metrics(uninterrupted)
    np.testing.assert_array_equal(trained(workdir), trained(uninterrupted))
