r"""The world experiment: does MLM help each baseline keep the asked context on held-out prompts?

    python -m mlmjax.world.experiment --workdir /tmp/world-exp
    python -m mlmjax.world.experiment --workdir /tmp/world-exp --methods ti,xti --seeds 0,1,2 --steps 500 \
        --images_per_prompt 4 --mlm_weight 1e-3 --set dreambooth.learning_rate=1e-4
    python -m mlmjax.world.experiment --workdir /tmp/world-lambda --methods ti --mlm_weight 1e-3,1e-2,1e-1

For every (method, MLM off/on, seed) it trains one customization of the embedded default model
(``mlmjax.train.train``; MLM off: ``mlm.weight = 0``, on: the method config's λ; the seed goes into
``config.seed``; ``--set METHOD.KEY=VALUE`` changes one field of one method's config, e.g. a learning
rate sized for the tiny model rather than Stable Diffusion) in ``DIR/runs/<method>-mlm_<off|on>-s<seed>``.
``--mlm_weight`` replaces the config's λ by one or more values, a λ sweep: one MLM-on run per value
and seed, in ``DIR/runs/<method>-mlm_<λ>-s<seed>``, one table row per value. Each run then samples
``--images_per_prompt`` images for each held-out world prompt (``captions.eval_prompts``, filled with the
run's concept phrase) plus the concept photos' own context ("{} on the kitchen table", a sanity check
that the concept was learned, sampled again with ``--own_context_images`` images), and scores every
image with the world evaluator against the scene the prompt asks for (``captions.scene_from_prompt``).
Per run: ``scores.json`` and ``grid.png``.

Rerunning the command continues where it stopped: a run whose ``scores.json`` exists is neither
retrained nor rescored, a trained run is only scored, an interrupted one resumes from its checkpoint.
Sampling uses one fixed seed for every run, so the same seeds give the same table. Scoring, the table
(``DIR/results.md``, ``DIR/results.json``), the grids (``DIR/comparison.png``, each run's ``grid.png``)
and, for a λ sweep, ``DIR/lambda.png`` are ``experiment_scores``'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Mapping, NoReturn, Sequence

import ml_collections

from mlmjax import config as config_lib
from mlmjax import runtime
from mlmjax.world import experiment_scores as scores_lib
from mlmjax.world import quality

if TYPE_CHECKING:
    from mlmjax.world.evaluator import Evaluator

RUNS_DIR = "runs"
SCORES_FILE = "scores.json"
MLM_SETTINGS = ("off", "on")


@dataclasses.dataclass(frozen=True)
class Options:
    """What the command was asked for, checked (see :func:`parse_args`)."""
    workdir: str
    methods: tuple[str, ...] = config_lib.METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    mlm: tuple[str, ...] = MLM_SETTINGS
    steps: int | None = None  # None: each method config's max_steps
    images_per_prompt: int = 4
    own_context_images: int = 8  # the sanity check's images of the concept photos' own context, per run
    mlm_weights: tuple[float, ...] = ()  # the MLM-on runs' λ values; (): each method config's λ
    max_prompts: int = 0  # 0: every held-out prompt
    prior_images: int = 8
    sampler_steps: int = quality.NUM_STEPS  # the world model's own sampler (DDIM)
    guidance: float = quality.GUIDANCE_SCALE
    grid_prompts: int = 4
    # Per-method config changes as written on the command line, e.g. {"dreambooth": (("learning_rate",
    # "1e-4"),)}; dotted keys reach nested fields ("prior.weight"). Parsed as mlmjax.train parses
    # --config.KEY=VALUE (mlmjax.config.load_config_file).
    overrides: Mapping[str, tuple[tuple[str, str], ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    method: str
    mlm: str  # "off" or "on"
    seed: int
    mlm_weight: float | None = None  # an MLM-on run's λ from --mlm_weight; None: the method config's

    @property
    def arm(self) -> tuple[str, str, float | None]:
        """What the run tests, without the seed: the table's row and the comparison grid's."""
        return self.method, self.mlm, self.mlm_weight

    @property
    def name(self) -> str:
        setting = self.mlm if self.mlm_weight is None else _weight_label(self.mlm_weight)
        return f"{self.method}-mlm_{setting}-s{self.seed}"


def _weight_label(weight: float) -> str:
    """λ as a run folder names it: short (``0.001``, ``1e-05``) where that reads back as the same number,
    else every digit, so two different values never share a folder (``0.0010000001``)."""
    short = f"{weight:g}"
    return short if float(short) == weight else repr(float(weight))


# --- the command line --------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's usage block -> one line, as every mlmjax command
        runtime.fail(f"{message}; see python -m mlmjax.world.experiment --help")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value <= 0:
        runtime.fail(f"--{flag}={value}: must be a positive integer")


def parse_args(argv: Sequence[str]) -> Options:
    """The flags, each bad value a one-line error that names the flag and what to do."""
    parser = _Parser(prog="python -m mlmjax.world.experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="receives runs/, results.md, results.json, grids")
    parser.add_argument("--methods", default=",".join(Options.methods), help="comma-separated baselines")
    parser.add_argument("--seeds", default=",".join(map(str, Options.seeds)), help="training seeds (config.seed)")
    parser.add_argument("--mlm", default=",".join(MLM_SETTINGS), help="off, on or off,on")
    parser.add_argument("--steps", type=int, help="training steps per run (default: each config's max_steps)")
    parser.add_argument("--images_per_prompt", type=int, default=Options.images_per_prompt,
                        help="images sampled per eval prompt")
    parser.add_argument("--own_context_images", type=int, default=Options.own_context_images,
                        help="images sampled per run of the concept photos' own context (the sanity check)")
    parser.add_argument("--mlm_weight", default="",
                        help="λ of the MLM-on runs, or several comma-separated for a λ sweep (default: each "
                             "config's)")
    parser.add_argument("--max_prompts", type=int, default=Options.max_prompts,
                        help="score only this many held-out prompts, spread over the caption types (0: all)")
    parser.add_argument("--prior_images", type=int, default=Options.prior_images,
                        help="prior.num_images of DreamBooth and Custom Diffusion (class images)")
    parser.add_argument("--sampler_steps", type=int, default=Options.sampler_steps, help="DDIM steps per image")
    parser.add_argument("--guidance", type=float, default=Options.guidance, help="classifier-free guidance scale")
    parser.add_argument("--grid_prompts", type=int, default=Options.grid_prompts, help="prompts shown in the grids")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="change one config field of one method's runs, e.g. dreambooth.learning_rate=1e-4 "
                             "(repeatable)")
    args = parser.parse_args(argv)
    methods = tuple(_split(args.methods))
    unknown = [m for m in methods if m not in config_lib.METHODS]
    if not methods or unknown:
        what = f"unknown method {', '.join(unknown)}" if unknown else "no method given"
        runtime.fail(f"--methods={args.methods!r}: {what}; choose from {','.join(config_lib.METHODS)}")
    mlm = tuple(_split(args.mlm))
    if not mlm or set(mlm) - set(MLM_SETTINGS):
        runtime.fail(f"--mlm={args.mlm}: give off, on or off,on")
    try:
        seeds = tuple(int(s) for s in _split(args.seeds))
    except ValueError:
        runtime.fail(f"--seeds={args.seeds}: must be comma-separated non-negative integers, e.g. 0,1,2")
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        runtime.fail(f"--seeds={args.seeds!r}: give at least one distinct non-negative integer, e.g. 0,1,2")
    for flag in ("steps", "images_per_prompt", "own_context_images", "prior_images", "sampler_steps",
                 "grid_prompts"):
        _positive(flag, getattr(args, flag))
    if args.max_prompts < 0:
        runtime.fail(f"--max_prompts={args.max_prompts}: must be 0 (all) or a positive integer")
    try:
        mlm_weights = tuple(float(w) for w in _split(args.mlm_weight))
    except ValueError:
        runtime.fail(f"--mlm_weight={args.mlm_weight}: must be comma-separated numbers, e.g. 1e-3,1e-2")
    if not all(w > 0 for w in mlm_weights) or len(set(mlm_weights)) != len(mlm_weights):
        runtime.fail(f"--mlm_weight={args.mlm_weight}: give distinct positive values (the MLM-off runs already "
                     "use 0)")
    if mlm_weights and "on" not in mlm:
        runtime.fail(f"--mlm_weight={args.mlm_weight} with --mlm={args.mlm}: λ is for MLM-on runs; add on to --mlm")
    options = Options(workdir=args.workdir, methods=methods, seeds=seeds, mlm=mlm, steps=args.steps,
                      images_per_prompt=args.images_per_prompt, own_context_images=args.own_context_images,
                      mlm_weights=mlm_weights, max_prompts=args.max_prompts, prior_images=args.prior_images,
                      sampler_steps=args.sampler_steps, guidance=args.guidance, grid_prompts=args.grid_prompts,
                      overrides=_parse_overrides(args.set, methods))
    for method, overrides in options.overrides.items():  # a bad key or value fails now, not mid-way
        try:
            config_lib.load_method_config(method, overrides)
        except ValueError as problem:
            runtime.fail(f"--set: {problem}")
    return options


_FLAG_OWNED = {"seed": "--seeds", "mlm.weight": "--mlm_weight (MLM off runs use 0)"}


def _parse_overrides(items: Sequence[str], methods: Sequence[str]) -> dict[str, tuple[tuple[str, str], ...]]:
    """``["dreambooth.learning_rate=1e-4"]`` -> ``{"dreambooth": (("learning_rate", "1e-4"),)}``."""
    overrides: dict[str, tuple[tuple[str, str], ...]] = {}
    for item in items:
        target, equals, text = item.partition("=")
        method, dot, key = target.partition(".")
        if not (equals and dot and key and text):
            runtime.fail(f"--set {item}: write METHOD.KEY=VALUE, e.g. dreambooth.learning_rate=1e-4")
        if method not in methods:
            runtime.fail(f"--set {item}: {method!r} is not one of --methods ({','.join(methods)})")
        if key in _FLAG_OWNED:
            runtime.fail(f"--set {item}: the experiment sets {key} itself; use {_FLAG_OWNED[key]}")
        overrides[method] = overrides.get(method, ()) + ((key, text),)
    return overrides


# --- one run -----------------------------------------------------------------------------------------

def _mlm_settings(options: Options) -> list[tuple[str, float | None]]:
    """(MLM setting, λ) in table order: off, then on at each --mlm_weight (or at the config's λ)."""
    return [(mlm, weight) for mlm in options.mlm
            for weight in ((options.mlm_weights or (None,)) if mlm == "on" else (None,))]


def run_specs(options: Options) -> list[RunSpec]:
    return [RunSpec(m, mlm, s, weight) for m in options.methods for mlm, weight in _mlm_settings(options)
            for s in options.seeds]


def run_config(spec: RunSpec, options: Options) -> ml_collections.ConfigDict:
    """The method's config (``configs/<method>.py``) with the experiment's seed, length and λ.

    The embedded default is used as ``mlmjax.train`` uses it (empty paths); end-of-run samples are
    off, the experiment draws its own.
    """
    settings = [("seed", str(spec.seed)), ("prior.num_images", str(options.prior_images)), ("sample_prompts", "()")]
    if options.steps:
        settings.append(("max_steps", str(options.steps)))
    # --set comes last, so it wins over the flags (a later override of the same key does).
    config = config_lib.load_method_config(spec.method, [*settings, *options.overrides.get(spec.method, ())])
    config.mlm.weight = 0.0 if spec.mlm == "off" else (spec.mlm_weight or config.mlm.weight)
    config.checkpoint.every = min(config.checkpoint.every, config.max_steps)
    return config


def run_dir(options: Options, spec: RunSpec) -> str:
    return os.path.join(options.workdir, RUNS_DIR, spec.name)


def is_trained(workdir: str, max_steps: int) -> bool:
    """Whether the run's latest checkpoint is its last step (so training would do nothing)."""
    from mlmjax import checkpoint as checkpoint_lib

    if not os.path.isdir(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)):
        return False  # (a Checkpointer would create the folder, and a new workdir must stay empty for train)
    checkpointer = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        return (checkpointer.latest_step() or 0) >= max_steps
    finally:
        checkpointer.close()


def _log(message: str) -> None:
    print(message, flush=True)


def _asked(spec: RunSpec, config: ml_collections.ConfigDict, options: Options, templates: list[str]) -> dict:
    """What a run's ``scores.json`` must say it answered to be reused (and says once written)."""
    return {"steps": config.max_steps, "mlm_weight": float(config.mlm.weight),
            "learning_rate": float(config.learning_rate),
            "overrides": _set_values(config, options.overrides.get(spec.method, ())),
            "sampling": scores_lib.sampling_settings(templates, options.images_per_prompt, options.sampler_steps,
                                                     options.guidance),
            "own_context_sampling": scores_lib.sampling_settings(
                [scores_lib.training_context_template()], options.own_context_images, options.sampler_steps,
                options.guidance)}


def _set_values(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> dict:
    """The values --set gave, as the config holds them (typed; JSON's lists for tuples)."""
    return json.loads(json.dumps({key: config_lib.config_value(config, key) for key, _ in overrides}))


def do_run(spec: RunSpec, options: Options, templates: list[str], evaluator: Evaluator, index: str) -> dict | None:
    """Trains (or resumes) and scores one run unless already done; returns its ``scores.json``, or
    None when training stopped early (SIGTERM): a partly trained run must not be scored."""
    from mlmjax import files
    from mlmjax import train as train_lib

    workdir = run_dir(options, spec)
    scores_path = os.path.join(workdir, SCORES_FILE)
    config = run_config(spec, options)
    if os.path.isfile(scores_path):
        scores = files.read_json_object(scores_path)
        scores_lib.check_same_scoring(scores, _asked(spec, config, options, templates), scores_path)
        _log(f"{index} {spec.name}: already scored, skipped")
        return scores
    start = time.time()
    if is_trained(workdir, config.max_steps):
        _log(f"{index} {spec.name}: already trained, not retrained")
    else:
        train_lib.train(config, workdir)
        if not is_trained(workdir, config.max_steps):
            return None
        _log(f"{index} {spec.name}: trained {config.max_steps} steps (λ = {config.mlm.weight:g}) "
             f"in {time.time() - start:.1f} s")
    start = time.time()
    asked = _asked(spec, config, options, templates)
    scores = {**scores_lib.score_run(workdir, asked["sampling"], asked["own_context_sampling"], evaluator,
                                     options.grid_prompts), "overrides": asked["overrides"]}
    files.write_json_atomic(scores_path, scores)  # last: it marks the run complete
    _log(f"{index} {spec.name}: scored {len(templates)} prompts × {options.images_per_prompt} images and "
         f"{options.own_context_images} of its own context in "
         f"{time.time() - start:.1f} s: held-out context fidelity {scores['heldout']['context_fidelity']:.3f}, "
         f"is_concept {scores['heldout']['is_concept']:.3f}")
    return scores


def run_experiment(options: Options) -> dict:
    """Every run (trained and scored, or read back), then the table and grids; returns results.json
    (empty if a run was stopped by SIGTERM, which ``mlmjax.train`` turns into a checkpoint)."""
    from mlmjax.world import evaluator as evaluator_lib

    templates = scores_lib.eval_templates(options.max_prompts)
    evaluator = evaluator_lib.load_evaluator()
    specs = run_specs(options)
    all_scores = {}
    for i, spec in enumerate(specs):
        all_scores[spec] = do_run(spec, options, templates, evaluator, f"[{i + 1}/{len(specs)}]")
        if all_scores[spec] is None:
            _log(f"{spec.name}: training stopped early (SIGTERM; checkpoint saved); rerun the command to resume")
            return {}
    return scores_lib.report(options, all_scores, {spec: run_dir(options, spec) for spec in specs})


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    runtime.enable_compilation_cache()
    try:
        run_experiment(options)
    except (ValueError, OSError) as error:
        runtime.fail(str(error))


if __name__ == "__main__":
    main()
