"""The world experiment's evaluation (``experiment.py``): prompts, one run's scores, the table and grids.

A run is scored on the held-out world prompts (``captions.eval_prompts``) and on the concept photos'
own context ("{} on the kitchen table"): every image is read back by the world evaluator against the
scene its prompt asks for (``captions.scene_from_prompt``). The own context is the last prompt of the
held-out images' sampling (the grids' last column) and is also sampled on its own, with more images
(``--own_context_images``, in ``own_context_images/``): its numbers are a sanity check per run, and two
images a run told apart only 0, 1/2 and 1.

Table rows: method × MLM off/on (on at each λ of a sweep); each number is the mean ± standard deviation over seeds of the runs'
means over the held-out prompts' images (``seeds``: how many runs). A second table lists every run's
numbers on the training context, where a learned concept should be drawn and recognised: if
``is_concept`` is low there too, the held-out numbers say nothing about MLM.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from PIL import Image

from mlmjax import files
from mlmjax import sampling
from mlmjax.world import captions
from mlmjax.world.scene import CONCEPT, CONCEPT_CONTEXT, Scene

if TYPE_CHECKING:
    from mlmjax.world.evaluator import Evaluator
    from mlmjax.world.experiment import Options, RunSpec

IMAGES_DIR = "eval_images"
OWN_CONTEXT_DIR = "own_context_images"
GRID_FILE = "grid.png"
RESULTS_MD, RESULTS_JSON = "results.md", "results.json"
COMPARISON_GRID = "comparison.png"
LAMBDA_PLOT = "lambda.png"  # written when a method ran MLM at several λ (a sweep)
# One sampler and noise seed for every run: differences between runs come from training alone.
SCHEDULER = "ddim"
SAMPLING_SEED = 0
SUMMARY_METRICS = ("context_fidelity", "prompt_fidelity", "is_concept", "concept_probability")
TABLE_METRICS = ("context_fidelity", "is_concept", "concept_probability")


# --- prompts -----------------------------------------------------------------------------------------

def spread(items: Sequence, count: int) -> list:
    """``count`` items evenly spaced over ``items`` (all of them for 0 or more): the held-out prompts
    are ordered by caption type, so a prefix would test backgrounds only."""
    if not count or count >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def training_context_template() -> str:
    """The concept photos' own context as a ``{}`` prompt: "{} on the kitchen table"."""
    return captions.caption(Scene(object=CONCEPT, background=CONCEPT_CONTEXT["background"]), concept_phrase="{}")


def eval_templates(max_prompts: int) -> list[str]:
    """The held-out ``{}`` prompts (``max_prompts`` of them, 0: all), then the training context last."""
    return spread(captions.eval_prompts("{}"), max_prompts) + [training_context_template()]


def sampling_settings(templates: list[str], images_per_prompt: int, steps: int, guidance: float) -> dict:
    """What ``mlmjax.evaluate.generated_images`` compares before it reuses a run's images."""
    return {"prompts": templates, "num_images": images_per_prompt, "scheduler": SCHEDULER, "steps": steps,
            "guidance": guidance, "seed": SAMPLING_SEED}


def grid_prompts(num_prompts: int, count: int) -> list[int]:
    """The prompts the grids show: ``count`` held-out ones spread over the types, and the training context."""
    return spread(range(num_prompts - 1), count) + [num_prompts - 1]


# --- one run -----------------------------------------------------------------------------------------

def _summary(scores: dict[str, np.ndarray], rows: slice) -> dict[str, float]:
    """Mean over the images in ``rows`` of each summary metric."""
    return {name: float(np.nanmean(scores[name][rows])) for name in SUMMARY_METRICS}


def _scored_prompts(run, images: np.ndarray, templates: list[str], evaluator: Evaluator):
    """Each image of ``images`` ``[P, n, H, W, 3]`` scored against its prompt's scene: ``(scores over the
    flattened images, per-prompt records)``."""
    from mlmjax import sample as sample_lib

    per = images.shape[1]
    texts = [sample_lib.fill_concept(t, run.concept_phrase) for t in templates]  # as sample_run fills them
    scenes = [captions.scene_from_prompt(t, run.concept_phrase) for t in texts for _ in range(per)]
    scores = evaluator.score(images.reshape(-1, *images.shape[2:]), scenes)
    prompts = [{"prompt": t, "text": text,
                **{name: [float(v) for v in scores[name][p * per:(p + 1) * per]] for name in SUMMARY_METRICS}}
               for p, (t, text) in enumerate(zip(templates, texts))]
    return scores, prompts


def score_run(workdir: str, settings: dict, own_context_settings: dict, evaluator: Evaluator, shown: int) -> dict:
    """Samples the run's images (kept in ``IMAGES_DIR`` and ``OWN_CONTEXT_DIR``, reused if there), scores
    them and writes the run's ``grid.png`` (``shown`` held-out prompts). Returns what ``scores.json``
    holds: per-image scores by prompt, the held-out means, and the means over the own context's images."""
    from mlmjax import evaluate
    from mlmjax import workdir as workdir_lib

    run = workdir_lib.load_trained(workdir)
    images = evaluate.generated_images(run, os.path.join(workdir, IMAGES_DIR), settings)  # [P, n, H, W, 3]
    scores, prompts = _scored_prompts(run, images, settings["prompts"], evaluator)
    own_images = evaluate.generated_images(run, os.path.join(workdir, OWN_CONTEXT_DIR), own_context_settings)
    own_scores, (own_prompt,) = _scored_prompts(run, own_images, own_context_settings["prompts"], evaluator)
    save_grid(images[grid_prompts(len(prompts), shown)], os.path.join(workdir, GRID_FILE))
    return {"method": run.config.method, "mlm_weight": float(run.config.mlm.weight),
            "learning_rate": float(run.config.learning_rate), "seed": int(run.config.seed),
            "steps": run.step, "concept_phrase": run.concept_phrase, "sampling": settings,
            "own_context_sampling": own_context_settings,
            "heldout": _summary(scores, slice(0, (len(prompts) - 1) * images.shape[1])),
            "training_context": _summary(own_scores, slice(None)), "prompts": prompts, "own_context": own_prompt}


def check_same_scoring(scores: dict, asked: dict, path: str) -> None:
    """A scored run is reused only for the same question (steps, λ, sampling), else the table would
    silently mix two experiments."""
    differ = [key for key, value in asked.items() if scores.get(key) != value]
    if differ:
        raise ValueError(f"{path}: was scored with other {' and '.join(differ)} than asked now; use a new "
                         "--workdir, or the flags it was run with")


def save_grid(images: np.ndarray, path: str, factor: int = 4) -> None:
    """``images`` ``[rows, columns, H, W, 3]`` as one PNG, upscaled ``factor``× (32 px is too small to see)."""
    grid = sampling.make_grid(images.reshape(-1, *images.shape[2:]), columns=images.shape[1])
    sampling.save_png(np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1), path)


# --- the table and the comparison grid ----------------------------------------------------------------

def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def _arms(specs: Sequence[RunSpec]) -> list[tuple]:
    """The runs' arms (method, MLM, λ) in the order the runs were asked for, each once."""
    return list(dict.fromkeys(spec.arm for spec in specs))


def table_rows(all_scores: Mapping[RunSpec, dict]) -> list[dict]:
    """One row per arm (method, MLM, λ) in the order asked: each metric's mean ± std over the seeds' runs."""
    rows = []
    for arm in _arms(list(all_scores)):
        runs = [scores for spec, scores in all_scores.items() if spec.arm == arm]
        row = {"method": arm[0], "mlm": arm[1], "mlm_weight": sorted({r["mlm_weight"] for r in runs}),
               "learning_rate": sorted({r["learning_rate"] for r in runs}),
               "seeds": len(runs), "steps": sorted({r["steps"] for r in runs})}
        for part in ("heldout", "training_context"):
            row[part] = {name: _mean_std([r[part][name] for r in runs]) for name in TABLE_METRICS}
        rows.append(row)
    return rows


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown(rows: list[dict], all_scores: Mapping[RunSpec, dict], options: Options) -> str:
    """The results table, then the per-run training-context sanity check."""
    settings = next(iter(all_scores.values()))["sampling"]
    shown = len(grid_prompts(len(settings["prompts"]), options.grid_prompts)) - 1
    lines = ["# World experiment: held-out context fidelity with and without MLM", "",
             f"{len(settings['prompts']) - 1} held-out prompts × {settings['num_images']} images per run, "
             f"{settings['scheduler']} {settings['steps']} steps, guidance {settings['guidance']:g}, sampling seed "
             f"{settings['seed']}; mean ± std over training seeds. comparison.png: one row per line of this "
             f"table (its first seed), columns: {shown} held-out prompts then the training context.",
             "", "| method | MLM | λ | lr | steps | context fidelity | is_concept | concept probability | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        weights = ", ".join(f"{w:g}" for w in row["mlm_weight"])
        rates = ", ".join(f"{r:g}" for r in row["learning_rate"])
        steps = ", ".join(str(s) for s in row["steps"])
        cells = " | ".join(_cell(row["heldout"][name]) for name in TABLE_METRICS)
        lines.append(f"| {row['method']} | {row['mlm']} | {weights} | {rates} | {steps} | {cells} | {row['seeds']} |")
    own = next(iter(all_scores.values()))["own_context_sampling"]["num_images"]
    lines += ["", f"Sanity check, the concept photos' own context ({training_context_template()!r}, {own} images "
              "per run), per run:", "",
              "| run | context fidelity | is_concept | concept probability |", "|---|---|---|---|"]
    for spec, scores in all_scores.items():
        cells = " | ".join(f"{scores['training_context'][name]:.3f}" for name in TABLE_METRICS)
        lines.append(f"| {spec.name} | {cells} |")
    return "\n".join(lines) + "\n"


def _first_image(run_dir: str, prompt: int) -> np.ndarray:
    """A run's first image of prompt ``prompt``, read back from its samples."""
    from mlmjax import sample as sample_lib

    folder = os.path.join(run_dir, IMAGES_DIR)
    record = files.read_json_object(os.path.join(folder, sample_lib.RECORD_FILE))
    return np.asarray(Image.open(os.path.join(folder, record["prompts"][prompt]["images"][0])).convert("RGB"))


def comparison_grid(options: Options, run_dirs: Mapping[RunSpec, str], path: str) -> None:
    """Rows: the table's (the first seed's run of each arm); columns: the same few held-out prompts and the
    training context, image 0 of each, so every cell of a column had the same sampling noise."""
    columns = grid_prompts(len(eval_templates(options.max_prompts)), options.grid_prompts)
    first_runs = {}
    for spec in run_dirs:
        first_runs.setdefault(spec.arm, run_dirs[spec])
    save_grid(np.array([[_first_image(run, p) for p in columns] for run in first_runs.values()]), path)


def _sweeps(rows: list[dict]) -> dict[str, tuple[dict | None, list[dict]]]:
    """Per method that ran MLM at two or more λ: (its MLM-off row or None, its MLM-on rows by λ)."""
    sweeps = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        on = sorted((r for r in rows if r["method"] == method and r["mlm"] == "on"), key=lambda r: r["mlm_weight"])
        if len({w for r in on for w in r["mlm_weight"]}) >= 2:
            off = next((r for r in rows if r["method"] == method and r["mlm"] == "off"), None)
            sweeps[method] = (off, on)
    return sweeps


def lambda_plot(rows: list[dict], path: str) -> bool:
    """Held-out context fidelity and is_concept against λ (log axis), one line per swept method with
    its seeds' spread, MLM off as a dashed level with its band; writes ``path`` (PNG) and returns True
    if some method was swept, else writes nothing."""
    sweeps = _sweeps(rows)
    if not sweeps:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    for ax, name in zip(figure.subplots(1, 2), ("context_fidelity", "is_concept")):
        for index, (method, (off, on)) in enumerate(sweeps.items()):
            color = f"C{index}"
            weights = [r["mlm_weight"][0] for r in on]
            means = np.array([r["heldout"][name]["mean"] for r in on])
            stds = np.array([r["heldout"][name]["std"] for r in on])
            ax.errorbar(weights, means, yerr=stds, color=color, marker="o", capsize=3, label=method)
            if off is not None:
                level, band = off["heldout"][name]["mean"], off["heldout"][name]["std"]
                ax.axhline(level, color=color, linestyle="--", linewidth=1)
                ax.axhspan(level - band, level + band, color=color, alpha=0.1)
        ax.set(xscale="log", xlabel="MLM weight λ", ylabel=name.replace("_", " "),
               title=f"held-out {name.replace('_', ' ')} (dashed: MLM off)")
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize="small")
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    return True


def report(options: Options, all_scores: Mapping[RunSpec, dict], run_dirs: Mapping[RunSpec, str]) -> dict:
    """Writes ``results.md``, ``results.json`` and ``comparison.png`` (and for a λ sweep ``lambda.png``)
    into the workdir, prints the table."""
    rows = table_rows(all_scores)
    text = markdown(rows, all_scores, options)
    results = {"rows": rows, "runs": {spec.name: {k: v for k, v in scores.items() if k != "prompts"}
                                      for spec, scores in all_scores.items()}}
    files.write_json_atomic(os.path.join(options.workdir, RESULTS_JSON), results)
    files.write_text_atomic(os.path.join(options.workdir, RESULTS_MD), text)
    comparison_grid(options, run_dirs, os.path.join(options.workdir, COMPARISON_GRID))
    lambda_plot(rows, os.path.join(options.workdir, LAMBDA_PLOT))
    print(text, flush=True)
    return results
