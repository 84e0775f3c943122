r"""Loss curves from ``metrics.jsonl``: ``WORKDIR/loss_curve.png`` at the end of training (and on
SIGTERM), and several runs overlaid in one figure from the command line.

    python -m mlmjax.plots --workdir /tmp/ti
    python -m mlmjax.plots --workdir /tmp/ti --workdir /tmp/ti0 --out /tmp/ti-mlm-vs-plain.png

One panel per loss the runs logged (the total ``loss``, ``loss_diff``, ``loss_prior``, ``loss_mlm``) and
one for ``mlm_accuracy``; x is the step. With many points the raw values are drawn faintly under a
moving average. A run is labelled by its ``config.json``: the method and the MLM weight.
One workdir is written to ``WORKDIR/loss_curve.png``, several to ``./loss_curves.png`` unless --out.

Figures are rendered by Agg without pyplot: no window ever opens and no global figure state is kept.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Sequence

from absl import app, flags
import numpy as np

from mlmjax import files
from mlmjax import loop as loop_lib
from mlmjax import runtime

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOSS_CURVE_FILE = "loss_curve.png"
OVERLAY_FILE = "loss_curves.png"
# mlmjax.workdir.CONFIG_FILE, not imported from there: that module loads the models' code, seconds
# that a plot should not wait for (tests/test_logging.py checks that the two agree).
CONFIG_FILE = "config.json"

# (metric in metrics.jsonl, panel title), in panel order; a panel is drawn when some run logged it.
PANELS = (
    ("loss", "training loss (total)"),
    ("loss_diff", "diffusion loss"),
    ("loss_prior", "prior-preservation loss"),
    ("loss_mlm", "MLM loss"),
    ("mlm_accuracy", "MLM accuracy on masked tokens"),
)
MAX_COLUMNS = 3  # panels in one row; more panels take two rows
# Fewer points than this are drawn as they are; more get a moving average over ~4% of them (2% on
# either side), enough to show the trend through step-to-step noise while keeping the curve's shape.
SMOOTH_FROM = 50
SMOOTH_HALF_WIDTH = 0.02


@dataclasses.dataclass(frozen=True)
class Run:
    label: str
    rows: list[dict[str, float]]  # metrics.jsonl


def run_label(workdir: str) -> str:
    """``ti, MLM λ=1e-05``, ``ti, no MLM`` or ``contextualizer`` from the run's ``config.json``; the
    folder's name when there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return os.path.basename(os.path.normpath(workdir))
    config = files.read_json_object(path)
    method = str(config.get("method", "?"))
    mlm = config.get("mlm")
    if not isinstance(mlm, dict) or "weight" not in mlm:  # contextualizer pretraining: MLM is the task
        return method
    return f"{method}, MLM λ={mlm['weight']:g}" if mlm["weight"] else f"{method}, no MLM"


def read_run(workdir: str) -> Run:
    return Run(label=run_label(workdir), rows=loop_lib.read_metrics(workdir))


def read_runs(workdirs: Sequence[str]) -> list[Run]:
    """The runs in ``workdirs``; runs that would share a label (a sweep of another setting) get their
    folder's name added, so the legend tells them apart."""
    runs = [read_run(workdir) for workdir in workdirs]
    labels = [run.label for run in runs]
    return [run if labels.count(run.label) == 1 else
            dataclasses.replace(run, label=f"{run.label} ({os.path.basename(os.path.normpath(workdir))})")
            for workdir, run in zip(workdirs, runs)]


def moving_average(values: np.ndarray, half_width: int) -> np.ndarray:
    """The mean of each value and up to ``half_width`` values on either side (fewer near the ends):
    centred, so the smoothed curve does not lag behind the raw points."""
    sums = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    index = np.arange(len(values))
    starts = np.maximum(index - half_width, 0)
    ends = np.minimum(index + half_width + 1, len(values))
    return (sums[ends] - sums[starts]) / (ends - starts)


def _series(rows: Sequence[dict[str, float]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have ``name``."""
    kept = [(row["step"], row[name]) for row in rows if name in row]
    return np.array([step for step, _ in kept]), np.array([value for _, value in kept], np.float64)


def _panels(runs: Sequence[Run]) -> list[tuple[str, str]]:
    return [(name, title) for name, title in PANELS if any(name in row for run in runs for row in run.rows)]


def plot_runs(runs: Sequence[Run]) -> Figure:
    """A figure with one panel per metric of :data:`PANELS` that any run logged,
    each run in its own color; ValueError if they logged none."""
    # Imported here: matplotlib takes a second to import, and only plotting needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(runs)
    if not panels:
        raise ValueError(f"nothing to plot: no run logged any of {', '.join(name for name, _ in PANELS)}")
    columns = len(panels) if len(panels) <= MAX_COLUMNS else math.ceil(len(panels) / 2)  # 4 panels: 2×2
    grid_rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * grid_rows), layout="constrained")
    FigureCanvasAgg(figure)  # renders with Agg whatever matplotlib's default backend is
    axes = figure.subplots(grid_rows, columns, squeeze=False).ravel()
    for ax, (name, title) in zip(axes, panels):
        for index, run in enumerate(runs):
            steps, values = _series(run.rows, name)
            if not len(steps):
                continue
            color = f"C{index}"
            if len(values) >= SMOOTH_FROM:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                values = moving_average(values, max(1, round(SMOOTH_HALF_WIDTH * len(values))))
            ax.plot(steps, values, color=color, linewidth=1.5, marker="." if len(values) < 20 else None,
                    label=run.label)
        ax.set(title=title, xlabel="step", ylabel=name)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.remove()
    if len(runs) == 1:
        figure.suptitle(runs[0].label)
    else:
        axes[0].legend(fontsize="small")
    return figure


def write_figure(runs: Sequence[Run], path: str) -> None:
    """Plots ``runs`` into the PNG ``path``, atomically: a reader or a kill mid-write sees the previous
    file or the new one, never part of one."""
    figure = plot_runs(runs)
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)


def write_loss_curve(workdir: str) -> str | None:
    """Writes ``WORKDIR/loss_curve.png`` from its ``metrics.jsonl`` and returns its path; None, and
    nothing written, while there is nothing to plot."""
    run = read_run(workdir)
    if not _panels([run]):
        return None
    path = os.path.join(workdir, LOSS_CURVE_FILE)
    write_figure([run], path)
    return path


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing this module defines none."""
    flags.DEFINE_multi_string("workdir", None, "a training run's workdir (repeat to overlay several runs)",
                              required=True)
    flags.DEFINE_string("out", None, f"the PNG to write (default: WORKDIR/{LOSS_CURVE_FILE} for one run, "
                        f"./{OVERLAY_FILE} for several)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        runtime.fail(f"unexpected arguments {argv[1:]}; pass each run with --workdir")
    workdirs, out = flags.FLAGS.workdir, flags.FLAGS.out
    try:
        runs = read_runs(workdirs)
        for workdir, run in zip(workdirs, runs):
            if not run.rows:
                raise ValueError(f"{workdir}: no {loop_lib.METRICS_FILE} rows; is it a training run that has "
                                 "logged a step?")
        out = out or (os.path.join(workdirs[0], LOSS_CURVE_FILE) if len(workdirs) == 1 else OVERLAY_FILE)
        write_figure(runs, out)
    except (ValueError, OSError) as error:
        runtime.fail(str(error))
    print(f"wrote {out}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=runtime.parse_flags)
