"""The host-side training loop shared by customization and contextualizer pretraining.

The step itself is a jitted pure function; this loop feeds it batches, shows a progress bar with the
losses, the masked-token accuracy and steps/s, appends the logged metrics to ``metrics.jsonl`` (one
JSON object per logged step, with ``step``; the run's record) and to TensorBoard event files in
``tensorboard/`` (:mod:`mlmjax.tensorboard_log`), saves checkpoints through a callback, stops cleanly
on SIGTERM, and stops, naming the step, if the loss stops being finite. When it stops it plots
``metrics.jsonl`` into ``loss_curve.png`` (:mod:`mlmjax.plots`).

With several processes (:mod:`mlmjax.distributed`) every process runs the same loop (steps, checks,
saves: all collective), and process 0 alone writes the files and shows the bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

import jax
import numpy as np
from tqdm import tqdm

from mlmjax import distributed
from mlmjax import files
from mlmjax import tensorboard_log

METRICS_FILE = "metrics.jsonl"

# What the progress bar shows, with short names: at most these five and steps/s, to fit a terminal.
BAR_FIELDS = {"loss": "loss", "loss_diff": "diff", "loss_prior": "prior", "loss_mlm": "mlm", "mlm_accuracy": "acc"}

T = TypeVar("T")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class LoopEnd:
    state: Any
    step: int  # steps done
    preempted: bool  # stopped by SIGTERM (state saved) before max_steps
    metrics: dict[str, float] | None = None  # the last logged row (every process has it); None if none ran


def _to_floats(metrics: dict) -> dict[str, float]:
    return {name: float(np.asarray(value)) for name, value in sorted(metrics.items())}


def _postfix(metrics: dict[str, float], steps_per_second: float) -> str:
    shown = [f"{short}={metrics[name]:.4g}" for name, short in BAR_FIELDS.items() if name in metrics]
    return " ".join(shown + [f"{steps_per_second:.1f} steps/s"])


_WARNED: set[str] = set()  # the missing optional packages already named on stderr


def _unless_missing(what: str, make: Callable[[], T]) -> T | None:
    """``make()``; or, when a package it imports is not installed, None and (once per package) a
    one-line warning: TensorBoard files and the loss curve are extras that no run stops for."""
    try:
        return make()
    except ModuleNotFoundError as error:
        package = (error.name or "?").partition(".")[0]
        if package not in _WARNED:
            _WARNED.add(package)
            print(f"warning: {package} is not installed (pip install {package}): no {what}; metrics.jsonl is "
                  "written as always", file=sys.stderr, flush=True)
        return None


@contextlib.contextmanager
def _tensorboard(workdir: str, first_step: int) -> Iterator[Callable[[dict[str, float]], None]]:
    """``write(row)`` into a new event file (see :mod:`mlmjax.tensorboard_log`), closed with the block;
    a no-op without tensorboardX, and on every process but process 0."""
    if not distributed.is_primary():
        yield lambda row: None
        return
    writer = _unless_missing("TensorBoard event files", lambda: tensorboard_log.ScalarWriter(workdir, first_step))
    if writer is None:
        yield lambda row: None
        return
    with writer:
        yield writer.write


@contextlib.contextmanager
def _loss_curve_when_done(workdir: str) -> Iterator[None]:
    """Plots ``metrics.jsonl`` into ``loss_curve.png`` when the block ends: normally, on SIGTERM, or
    when the loss diverged (the curve up to there is the first thing to look at). Process 0 only."""
    from mlmjax import plots  # here: plots reads metrics.jsonl through this module

    def plot() -> None:
        if distributed.is_primary():
            _unless_missing(plots.LOSS_CURVE_FILE, lambda: plots.write_loss_curve(workdir))

    try:
        yield
    except NonFiniteLossError:
        plot()
        raise
    plot()


@contextlib.contextmanager
def _metrics_log(path: str) -> Iterator[Any]:
    """``metrics.jsonl`` opened for appending on process 0; a sink that drops every row elsewhere."""
    with open(path if distributed.is_primary() else os.devnull, "a") as log:
        yield log


@contextlib.contextmanager
def preemption_guard() -> Iterator[threading.Event]:
    """An event set by SIGTERM (how TPU and SLURM preemption arrive) while the block runs.

    The loop checks it between steps, saves and returns; the previous handler comes back after (the
    default one where the previous was not Python's: ``jax.distributed`` installs its own in C++).
    Outside the main thread (where Python allows no handlers) the event simply never fires.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def train_loop(
    step_fn: Callable[[Any, dict, jax.Array], tuple[Any, dict]],
    state: Any,
    batches: Iterator[dict],
    rng: jax.Array,
    *,
    max_steps: int,
    workdir: str,
    log_every: int,
    start_step: int = 0,
    description: str = "train",
    save: Callable[[int, Any], None] | None = None,
    save_every: int = 0,
    stop: threading.Event | None = None,
    last_saved_step: int | None = None,
) -> LoopEnd:
    """Runs steps ``start_step .. max_steps-1`` on ``next(batches)``; returns the final state.

    Metrics are fetched from the device only every ``log_every`` steps, at save steps and at the
    last step, so the host never waits on the device in between. ``save(step, state)`` runs every
    ``save_every`` steps, at the end and when ``stop`` is set (then the loop returns early), each
    time after the loss and gradient norm of the step that made ``state`` were checked finite: a
    checkpoint never holds a diverged state. A non-finite loss raises, naming the step and the last
    good checkpoint. A metrics row is logged at the run's first step and every ``log_every``
    steps, so a resumed run logs exactly the rows of an uninterrupted one. ``loss_curve.png`` is
    written when the loop returns (SIGTERM included) or the loss diverges.

    With several processes every one calls this together: the checks and saves happen on all of them
    at the same steps (the metrics are replicated; ``stop`` set on any process stops all at the same
    step), and only process 0 writes ``metrics.jsonl``, TensorBoard and the curve, and shows the bar.
    """
    path = os.path.join(workdir, METRICS_FILE)
    done, last_finite, row = start_step, None, None
    if start_step >= max_steps:  # a finished run rerun: nothing to run, log or plot
        return LoopEnd(state=state, step=done, preempted=False)
    several = jax.process_count() > 1
    # The step was just compiled (or read from the compilation cache) by each process on its own:
    # wait for the slowest before the first collective.
    distributed.barrier("train loop start")
    # This session's TensorBoard file supersedes what earlier files hold from its first step on, as
    # truncate_metrics did for metrics.jsonl before a resume. The bar opens last, so that a warning
    # printed on the way in gets a line of its own.
    with (_loss_curve_when_done(workdir),
          _metrics_log(path) as log,
          _tensorboard(workdir, first_step=start_step + 1) as write_scalars,
          tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=description,
               dynamic_ncols=True, mininterval=1.0, disable=not distributed.is_primary()) as bar):
        last_time, last_step = time.perf_counter(), start_step
        for step in bar:
            state, metrics = step_fn(state, next(batches), rng)
            done = step + 1
            stopping = stop is not None and stop.is_set()
            if several and stop is not None:  # a SIGTERM on one host stops every host at this step
                stopping = distributed.any_process(stopping)
            saving = save is not None and (stopping or done == max_steps or (save_every and done % save_every == 0))
            logging = done % log_every == 0 or done == max_steps or step == 0
            if not (saving or logging):
                continue
            values = _to_floats(metrics)
            for name in ("loss", "grad_norm"):
                if name in values and not math.isfinite(values[name]):
                    kept = "no checkpoint was kept" if last_saved_step is None else \
                        f"the last good checkpoint is step {last_saved_step}"
                    since = "" if last_finite is None else f" (finite at step {last_finite}, the previous check)"
                    raise NonFiniteLossError(f"{name} is {values[name]} at step {done}{since}; {kept}; lower the "
                                             "learning rate or check the data")
            last_finite = done
            if logging:
                now = time.perf_counter()
                rate = (done - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, done
                row = {"step": done, **values}
                log.write(json.dumps(row) + "\n")
                log.flush()
                write_scalars(row)
                bar.set_postfix_str(_postfix(values, rate), refresh=False)
            if saving:
                save(done, state)
                last_saved_step = done
            if stopping:
                break
    return LoopEnd(state=state, step=done, preempted=done < max_steps, metrics=row)


def read_metrics(workdir: str) -> list[dict]:
    """The rows of ``metrics.jsonl`` ([] if there is none).

    A last line that is not a whole JSON row is what a kill in mid-write leaves: it is dropped (a
    resume's ``truncate_metrics`` then rewrites the file without it). Any other bad line is an error
    naming the file and line, since the record would be silently wrong.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for position, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        elif position < len(lines) - 1 or line.endswith("\n"):
            raise ValueError(f"{path}:{number}: not a metrics row ({line.strip()[:60]!r}); the file is damaged; "
                             "move it away to start the record afresh")
    return rows


def truncate_metrics(workdir: str, step: int) -> None:
    """Drops the rows after ``step``: a resumed run re-logs the steps after its checkpoint.

    Rewrites the file atomically, so an interruption here loses nothing. Process 0 only: another
    process's rewrite could replace the file under process 0's open log.
    """
    if not distributed.is_primary():
        return
    rows = [row for row in read_metrics(workdir) if row["step"] <= step]
    files.write_text_atomic(os.path.join(workdir, METRICS_FILE), "".join(json.dumps(row) + "\n" for row in rows))
