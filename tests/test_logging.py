"""What a run's metrics become besides ``metrics.jsonl``: TensorBoard scalars (also across a resume),
the progress bar, ``loss_curve.png`` and ``python -m mlmjax.plots``.

The loop is driven by a fake step function (no model, nothing to compile) whose metrics are simple
functions of the step, so every expected value is known.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mlmjax import loop
from mlmjax import plots
from mlmjax import tensorboard_log
from mlmjax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_step(session: int = 0, sigterm_at: int | None = None):
    """A step function whose state counts steps and whose metrics depend on the step and on
    ``session``: a value that differs between sessions stands for a re-run on hardware that is not
    bitwise deterministic, so a stale point cannot pass for a re-logged one."""
    def step_fn(state, batch, rng):
        state = state + 1
        if sigterm_at is not None and int(state) == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, {"loss": 1.0 / state + session, "loss_diff": 0.5 / state, "loss_mlm": 2.0 / state,
                       "mlm_accuracy": state / 100.0, "grad_norm": jnp.float32(1), "lr": jnp.float32(1e-3)}
    return step_fn


def run_loop(workdir, *, max_steps: int, log_every: int = 1, start_step: int = 0, session: int = 0,
             sigterm_at: int | None = None, **kwargs) -> loop.LoopEnd:
    """``loop.train_loop`` on the fake step in ``workdir`` (created), from ``start_step``."""
    os.makedirs(workdir, exist_ok=True)
    return loop.train_loop(fake_step(session, sigterm_at), jnp.float32(start_step), iter(lambda: {}, None),
                           jax.random.key(0), max_steps=max_steps, workdir=str(workdir), log_every=log_every,
                           start_step=start_step, **kwargs)


def scalars_of(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard series that ``rows`` should be: event files hold float32 values."""
    names = sorted({name for row in rows for name in row} - {"step"})
    return {name: [(row["step"], float(np.float32(row[name]))) for row in rows if name in row] for name in names}


def logdir(workdir) -> str:
    return os.path.join(workdir, tensorboard_log.DIRECTORY)


def test_every_metrics_row_is_a_tensorboard_scalar_at_its_step(tmp_path):
    run_loop(tmp_path, max_steps=7, log_every=3)
    rows = loop.read_metrics(str(tmp_path))
    assert [row["step"] for row in rows] == [1, 3, 6, 7]
    assert tensorboard_log.read_scalars(logdir(tmp_path)) == scalars_of(rows)
    [path] = tensorboard_log.event_files(logdir(tmp_path))
    events = list(tensorboard_log.read_events(path))
    assert events[0].file_version == "brain.Event:2"
    assert [event.step for event in events if event.HasField("session_log")] == [1]  # purge_step: the first step
    assert len([event for event in events if event.HasField("summary")]) == 4 * 6
    run_loop(tmp_path, max_steps=7, start_step=7)  # a finished run rerun writes no file
    assert tensorboard_log.event_files(logdir(tmp_path)) == [path]


def test_a_resumed_session_supersedes_the_points_after_its_checkpoint(tmp_path):
    """Killed after step 6 with its checkpoint at 3, resumed with another log_every: the first file
    keeps its stale points 4-6, and TensorBoard's reading of both files gives exactly metrics.jsonl
    (the START drops step 4, which the resumed session does not log)."""
    with loop.preemption_guard() as preempted:  # steps 1-6 logged, as by a run killed after step 6
        run_loop(tmp_path, max_steps=10, log_every=1, stop=preempted, sigterm_at=6)
    loop.truncate_metrics(str(tmp_path), 3)  # what resumable does before resuming from checkpoint 3
    run_loop(tmp_path, max_steps=10, log_every=5, start_step=3, session=1)
    rows = loop.read_metrics(str(tmp_path))
    assert [(row["step"], row["loss"] > 1) for row in rows] == [(1, False), (2, False), (3, False), (5, True),
                                                                (10, True)]
    assert tensorboard_log.read_scalars(logdir(tmp_path)) == scalars_of(rows)

    # Honest about the files: the sessions ran within a second, yet their files are two, in order,
    # the first untouched and the second opening with its START at step 4.
    first, second = tensorboard_log.event_files(logdir(tmp_path))
    assert sorted({event.step for event in tensorboard_log.read_events(first) if event.HasField("summary")}) == \
        [1, 2, 3, 4, 5, 6]
    assert [event.step for event in tensorboard_log.read_events(second) if event.HasField("session_log")] == [4]


def test_a_truncated_event_file_reads_up_to_its_last_whole_record(tmp_path):
    run_loop(tmp_path, max_steps=4)
    [path] = tensorboard_log.event_files(logdir(tmp_path))
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) - 3)  # a kill in the middle of the last record
    scalars = tensorboard_log.read_scalars(logdir(tmp_path))
    # A row's scalars are written in name order: mlm_accuracy was the last record.
    assert scalars["mlm_accuracy"][-1][0] == 3 and scalars["lr"][-1][0] == 4


def test_without_tensorboardx_the_run_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX now fails
    monkeypatch.setattr(loop, "_WARNED", set())
    run_loop(tmp_path / "a", max_steps=2)
    run_loop(tmp_path / "b", max_steps=2)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: tensorboardX is not installed (pip install tensorboardX): no TensorBoard event "
                        "files; metrics.jsonl is written as always"]
    assert [row["step"] for row in loop.read_metrics(str(tmp_path / "b"))] == [1, 2]
    assert not os.path.exists(logdir(tmp_path / "b"))
    assert os.path.exists(tmp_path / "b" / plots.LOSS_CURVE_FILE)


def test_the_progress_bar_shows_the_losses_accuracy_and_rate_in_six_fields():
    values = {"grad_norm": 1.0, "loss": 0.25, "loss_diff": 0.125, "loss_mlm": 10.5, "loss_prior": 0.5, "lr": 1e-3,
              "mlm_accuracy": 0.375}
    assert loop._postfix(values, 12.34) == "loss=0.25 diff=0.125 prior=0.5 mlm=10.5 acc=0.375 12.3 steps/s"
    assert loop._postfix({"loss": 2.0, "mlm_accuracy": 0.5, "lr": 1e-4}, 3.0) == "loss=2 acc=0.5 3.0 steps/s"


def test_the_loss_curve_is_written_at_the_end_on_sigterm_and_on_divergence(tmp_path):
    with loop.preemption_guard() as preempted:
        end = run_loop(tmp_path / "sigterm", max_steps=100, stop=preempted, sigterm_at=60)
    assert end.preempted and end.step == 60
    with Image.open(tmp_path / "sigterm" / plots.LOSS_CURVE_FILE) as image:  # four panels, 2×2
        assert image.format == "PNG" and 800 <= image.width <= 1600 and 500 <= image.height <= 900
    assert sorted(os.listdir(tmp_path / "sigterm")) == ["loss_curve.png", "metrics.jsonl", "tensorboard"]

    def diverging(state, batch, rng):
        state = state + 1
        return state, {"loss": jnp.where(state >= 5, jnp.nan, 1.0 / state)}

    os.makedirs(tmp_path / "nan")
    with pytest.raises(loop.NonFiniteLossError):
        loop.train_loop(diverging, jnp.float32(0), iter(lambda: {}, None), jax.random.key(0), max_steps=10,
                        workdir=str(tmp_path / "nan"), log_every=2)
    assert os.path.getsize(tmp_path / "nan" / plots.LOSS_CURVE_FILE) > 1000


def test_the_loss_curve_is_replaced_atomically(tmp_path, monkeypatch):
    """A write cut off half way (here savefig failing after some bytes) leaves the previous PNG whole."""
    from matplotlib.figure import Figure

    run_loop(tmp_path, max_steps=3)
    path = tmp_path / plots.LOSS_CURVE_FILE
    before = path.read_bytes()

    def cut_off(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(before[:100])
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", cut_off)
    with pytest.raises(OSError, match="disk full"):
        plots.write_loss_curve(str(tmp_path))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["loss_curve.png", "metrics.jsonl", "tensorboard"]  # no temporary left


def _workdir(folder, method: str, rows: list[dict], mlm_weight: float | None) -> str:
    """A workdir as training leaves it, as far as plots reads it: config.json and metrics.jsonl."""
    os.makedirs(folder)
    config = {"method": method, **({} if mlm_weight is None else {"mlm": {"weight": mlm_weight}})}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / loop.METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


def _rows(count: int, mlm: bool) -> list[dict]:
    noise = np.random.default_rng(0).normal(0, 0.02, count)
    return [{"step": 10 * (i + 1), "loss": 0.3 / (i + 1) ** 0.3 + noise[i], "loss_diff": 0.3 / (i + 1) ** 0.3,
             **({"loss_mlm": 3.0 - i / count, "mlm_accuracy": i / count} if mlm else {})} for i in range(count)]


def test_runs_are_labelled_by_method_and_mlm_weight_and_overlaid(tmp_path):
    with_mlm = _workdir(tmp_path / "ti", "ti", _rows(300, mlm=True), 1e-5)
    plain = _workdir(tmp_path / "ti0", "ti", _rows(300, mlm=False), 0.0)
    context = _workdir(tmp_path / "ctx", "contextualizer", [{"step": 1, "loss": 5.0, "mlm_accuracy": 0.1}], None)
    assert [plots.run_label(w) for w in (with_mlm, plain, context)] == ["ti, MLM λ=1e-05", "ti, no MLM",
                                                                        "contextualizer"]
    assert plots.CONFIG_FILE == workdir_lib.CONFIG_FILE
    twin = _workdir(tmp_path / "ti-lr", "ti", _rows(10, mlm=True), 1e-5)
    assert [run.label for run in plots.read_runs([with_mlm, twin])] == ["ti, MLM λ=1e-05 (ti)",
                                                                         "ti, MLM λ=1e-05 (ti-lr)"]

    figure = plots.plot_runs(plots.read_runs([with_mlm, plain]))
    panels = {ax.get_title(): ax for ax in figure.axes}
    assert list(panels) == ["training loss (total)", "diffusion loss", "MLM loss", "MLM accuracy on masked tokens"]
    assert [line.get_label() for line in panels["training loss (total)"].get_lines()
            if not line.get_label().startswith("_")] == ["ti, MLM λ=1e-05", "ti, no MLM"]
    assert len(panels["MLM loss"].get_lines()) == 2  # one run: raw points and their moving average
    smoothed = panels["diffusion loss"].get_lines()[1].get_ydata()
    np.testing.assert_allclose(smoothed[-1], np.mean([row["loss_diff"] for row in _rows(300, True)][-7:]))


def test_the_moving_average_is_centred_and_shrinks_at_the_ends():
    np.testing.assert_allclose(plots.moving_average(np.array([1.0, 3.0, 5.0, 7.0, 9.0]), 1), [2, 3, 5, 7, 8])


def _plots_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlmjax.plots", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)


def test_the_plots_command_overlays_two_workdirs_and_refuses_one_without_metrics(tmp_path):
    with_mlm = _workdir(tmp_path / "ti", "ti", _rows(300, mlm=True), 1e-5)
    plain = _workdir(tmp_path / "ti0", "ti", _rows(300, mlm=False), 0.0)
    out = tmp_path / "overlay.png"
    result = _plots_cli("--workdir", with_mlm, "--workdir", plain, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"wrote {out}"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > image.height > 400

    empty = tmp_path / "empty"
    empty.mkdir()
    result = _plots_cli("--workdir", with_mlm, "--workdir", str(empty))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {empty}: no metrics.jsonl rows; is it a training run that has logged a step?"]


def test_read_metrics_drops_a_torn_last_line_and_refuses_a_damaged_one(tmp_path):
    path = tmp_path / loop.METRICS_FILE
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-write
    assert [row["step"] for row in loop.read_metrics(str(tmp_path))] == [1, 2]
    loop.truncate_metrics(str(tmp_path), 2)  # what a resume does: the torn line is gone for good
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
    path.write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 3, "loss": 0.4}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics row"):
        loop.read_metrics(str(tmp_path))
    # The sweep treats a damaged record as an unfinished run (mlmjax.train then says what is wrong).
    spec = importlib.util.spec_from_file_location("launch_sweep", os.path.join(ROOT, "launch", "sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sweep  # dataclasses look their module up there
    spec.loader.exec_module(sweep)
    assert sweep.read_metrics(str(tmp_path)) == []
