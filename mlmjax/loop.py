"""The host-side training loop shared by customization and contextualizer pretraining.

The step itself is a jitted pure function; this loop feeds it batches, shows a progress bar with the
losses and steps/s, appends the logged metrics to ``metrics.jsonl`` (one JSON object per logged step,
with ``step``) and stops, naming the step, if the loss stops being finite.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def _to_floats(metrics: dict) -> dict[str, float]:
    return {name: float(np.asarray(value)) for name, value in sorted(metrics.items())}


def _postfix(metrics: dict[str, float], steps_per_second: float) -> str:
    shown = [f"{name.removeprefix('loss_') if name != 'loss' else name}={value:.4g}"
             for name, value in metrics.items() if name.startswith("loss")]
    return " ".join(shown + [f"{steps_per_second:.1f} steps/s"])


def train_loop(
    step_fn: Callable[[Any, dict, jax.Array], tuple[Any, dict]],
    state: Any,
    make_batch: Callable[[int], dict],
    rng: jax.Array,
    *,
    max_steps: int,
    workdir: str,
    log_every: int,
    start_step: int = 0,
    description: str = "train",
    on_step: Callable[[int, Any], None] | None = None,
) -> Any:
    """Runs steps ``start_step .. max_steps-1``; returns the final state.

    Metrics are fetched from the device only every ``log_every`` steps (and at the last step), so
    the host never waits on the device in between. ``on_step(step, state)`` runs after each step
    (checkpointing hooks).
    """
    path = os.path.join(workdir, METRICS_FILE)
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=description,
               dynamic_ncols=True, mininterval=1.0)
    last_time, last_step = time.perf_counter(), start_step
    with open(path, "a") as log:
        for step in bar:
            state, metrics = step_fn(state, make_batch(step), rng)
            if (step + 1) % log_every == 0 or step + 1 == max_steps or step == start_step:
                values = _to_floats(metrics)
                if not math.isfinite(values["loss"]):
                    raise NonFiniteLossError(f"loss is {values['loss']} at step {step}; lower the learning rate "
                                             "or check the data (nothing after the last good step was kept)")
                now = time.perf_counter()
                rate = (step + 1 - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step + 1
                log.write(json.dumps({"step": step + 1, **values}) + "\n")
                log.flush()
                bar.set_postfix_str(_postfix(values, rate), refresh=False)
            if on_step is not None:
                on_step(step + 1, state)
    bar.close()
    return state


def read_metrics(workdir: str) -> list[dict]:
    """The rows of ``metrics.jsonl``."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
