"""Pretrains the world's tiny text-to-image model from scratch, stage by stage, on this CPU.

    python -m mlmjax.world.pretrain --workdir /tmp/world
    python -m mlmjax.world.pretrain --workdir /tmp/world --export mlmjax/assets/tiny

Stages, in this order, each reading and rewriting the diffusers-layout folder ``<workdir>/model``
(created with the embedded architecture and random weights, ``mlmjax.tiny`` with its ``WORLD``
changes, if absent):

1. ``captions``: ``<workdir>/captions.txt``, the corpus the contextualizer pretrains on;
2. ``vae``: the autoencoder (:mod:`mlmjax.world.pretrain_vae`), then its latent scaling factor;
3. ``text``: the text encoder, contrastive against an image tower (:mod:`mlmjax.world.pretrain_text`);
4. ``contextualizer``: masked language modelling on the stage-3 text encoder, as
   ``python -m mlmjax.train --config configs/contextualizer.py:world`` runs it, into ``<workdir>/ctx``;
5. ``unet``: the UNet by denoising, the text encoder frozen (:mod:`mlmjax.world.pretrain_unet`), then a
   check: images generated for plain prompts, read back by the world's evaluator.

One process runs them one after the other: the scenes are rendered once, and each stage's step is
data-parallel over ``--cpu_devices`` CPU devices (:mod:`mlmjax.world.fitting` says why), which keeps
both cores busier than two stages side by side did. The shipped model was made with the default, 2.

Each stage logs into ``<workdir>/<stage>/`` (``ctx/`` for the contextualizer: progress bar,
``metrics.jsonl``, ``loss_curve.png``) and adds its numbers, and its minutes, to
``<workdir>/summary.json``. A stage run again moves its earlier logs aside and starts from the weights
the workdir holds: ``--stages unet`` a second time trains the UNet further (``summary.json`` counts
its total steps); the contextualizer always starts afresh. ``--export`` writes the embedded default:
the model in float16 without its tokenizer (the vendored CLIP vocabulary stands in), the
contextualizer from ``<workdir>/ctx/contextualizer``, the concept's photos and the class pictures.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import time
from typing import Sequence

import jax
import numpy as np

from mlmjax import config as config_lib
from mlmjax import files
from mlmjax import loop
from mlmjax import pretrain_contextualizer
from mlmjax import pretrained as pretrained_lib
from mlmjax import runtime
from mlmjax import sampling
from mlmjax import tiny
from mlmjax.world import corpus as corpus_lib
from mlmjax.world import evaluator as evaluator_lib
from mlmjax.world import pretrain_text, pretrain_unet, pretrain_vae, quality

STAGES = ("captions", "vae", "text", "contextualizer", "unet")
IMAGE_STAGES = ("vae", "text", "unet")  # the stages that train on rendered scenes
# How the embedded default's contextualizer is pretrained; --contextualizer overrides its fields.
CONTEXTUALIZER_CONFIG = os.path.join(config_lib.CONFIGS_DIR, "contextualizer.py") + ":world"
CONTEXTUALIZER_WORKDIR = "ctx"  # the contextualizer stage's workdir (logs, checkpoints, result), in --workdir
CORPUS_SEED = 100
HELD_OUT_SEED = 101  # scenes no stage trains on
CAPTIONS_SEED = 102
NUM_CONCEPT_PHOTOS = 5
NUM_CLASS_PICTURES = 12


@dataclasses.dataclass(frozen=True)
class Plan:
    workdir: str
    corpus_size: int = 40_000
    captions: int = 50_000
    check_prompts: int = 64
    vae: pretrain_vae.Options = pretrain_vae.Options()
    text: pretrain_text.Options = pretrain_text.Options()
    unet: pretrain_unet.Options = pretrain_unet.Options()
    contextualizer: tuple[tuple[str, str], ...] = ()  # config overrides, (dotted key, text) pairs

    @property
    def model_dir(self) -> str:
        return os.path.join(self.workdir, "model")

    @property
    def captions_path(self) -> str:
        return os.path.join(self.workdir, "captions.txt")


def _fresh_log_folder(workdir: str, stage: str) -> str:
    """``<workdir>/<stage>``, empty: an earlier run's logs move to ``<stage>.1``, ``<stage>.2``, ..."""
    folder = os.path.join(workdir, stage)
    if os.path.isdir(folder) and os.listdir(folder):
        earlier = 1
        while os.path.exists(f"{folder}.{earlier}"):
            earlier += 1
        os.replace(folder, f"{folder}.{earlier}")
    os.makedirs(folder, exist_ok=True)
    return folder


def _run_loop(workdir: str, stage: str, seed: int):
    def run(step_fn, state, batches, steps):
        folder = _fresh_log_folder(workdir, stage)
        return loop.train_loop(step_fn, state, batches, jax.random.key(seed), max_steps=steps, workdir=folder,
                               log_every=max(1, min(50, steps // 10)), description=stage).state
    return run


def _load_model(plan: Plan) -> pretrained_lib.Pretrained:
    if os.path.isfile(os.path.join(plan.model_dir, "model_index.json")):
        return pretrained_lib.load_pretrained(plan.model_dir)
    return tiny.tiny_pretrained(seed=0, changes=tiny.WORLD)


def _save_model(plan: Plan, model: pretrained_lib.Pretrained) -> None:
    pretrained_lib.save_pretrained(plan.model_dir, model, overwrite=True)


def _recorded(plan: Plan) -> dict:
    path = os.path.join(plan.workdir, "summary.json")
    return files.read_json_object(path) if os.path.isfile(path) else {}


def _record(plan: Plan, stage: str, numbers: dict) -> None:
    summary = _recorded(plan)
    summary[stage] = numbers
    path = os.path.join(plan.workdir, "summary.json")
    files.write_json_atomic(path, summary)
    print(f"{stage}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()))


def _vae_stage(plan: Plan, model, corpus, held_out):
    params = pretrain_vae.train(model.vae, model.params["vae"], corpus, plan.vae,
                                _run_loop(plan.workdir, "vae", plan.vae.seed))
    scale = pretrain_vae.scaling_factor(*pretrain_vae.latent_moments(model.vae, params, corpus.images[:4096]))
    vae_config = dict(model.vae.config.to_dict(), scaling_factor=scale)
    vae = pretrained_lib.build_component("vae", vae_config, source="world pretraining")
    model = dataclasses.replace(model, vae=vae, params={**model.params, "vae": params})
    return model, {"steps": plan.vae.steps, "scaling_factor": scale,
                   "held_out_reconstruction_error_levels": pretrain_vae.reconstruction_error(vae, params,
                                                                                             held_out.images)}


def _text_stage(plan: Plan, model, corpus, held_out):
    params, accuracy = pretrain_text.train(model.text_encoder, model.params["text_encoder"], model.tokenizer,
                                           corpus, held_out, plan.text,
                                           _run_loop(plan.workdir, "text", plan.text.seed))
    model = dataclasses.replace(model, params={**model.params, "text_encoder": params})
    return model, {"steps": plan.text.steps, "held_out_retrieval_accuracy": accuracy,
                   "batch_size": plan.text.batch_size}


def _unet_stage(plan: Plan, model, corpus, held_out):
    del held_out
    moments = pretrain_vae.latent_moments(model.vae, model.params["vae"], corpus.images)
    params = pretrain_unet.train(model, corpus, moments, plan.unet, _run_loop(plan.workdir, "unet", plan.unet.seed))
    model = dataclasses.replace(model, params={**model.params, **params})
    # A rerun of this stage continues from the UNet in the workdir: count every step it has had.
    total = _recorded(plan).get("unet", {}).get("total_steps", 0) + plan.unet.steps
    return model, {"steps": plan.unet.steps, "total_steps": total, "batch_size": plan.unet.batch_size,
                   "learning_rate": plan.unet.learning_rate, **check(plan, model)}


def _contextualizer_stage(plan: Plan) -> dict:
    for path in (plan.captions_path, os.path.join(plan.model_dir, "model_index.json")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the contextualizer stage needs the captions and text stages first")
    config = config_lib.load_config_file(
        CONTEXTUALIZER_CONFIG, [("pretrained", plan.model_dir), ("captions", plan.captions_path), *plan.contextualizer])
    metrics = pretrain_contextualizer.run(config, _fresh_log_folder(plan.workdir, CONTEXTUALIZER_WORKDIR))
    return {"steps": config.max_steps, "batch_size": config.batch_size,
            "held_out_masked_accuracy": metrics["heldout_mlm_accuracy_after"]}


def check(plan: Plan, model) -> dict:
    """Images for `plan.check_prompts` plain prompts, scored; writes ``<workdir>/check.png``."""
    prompts, asked = quality.plain_prompts(plan.check_prompts, quality.CHECK_SEED)
    scored = quality.generate_and_score(model, evaluator_lib.load_evaluator(), prompts, asked,
                                         seed=quality.CHECK_SEED)
    sampling.save_grid(scored.images, plan.workdir, columns=8, name="check.png")
    files.write_text_atomic(os.path.join(plan.workdir, "check_prompts.txt"), "\n".join(prompts) + "\n")
    names = ["prompt_fidelity", "match/object", "match/color", "match/background", "match/wearing", "match/style"]
    means = {f"check_{name.replace('match/', '')}": scored.mean(name) for name in names}
    return {name: value for name, value in means.items() if value is not None}


def run(plan: Plan, stages: Sequence[str]) -> None:
    """Runs `stages` in :data:`STAGES` order."""
    os.makedirs(plan.workdir, exist_ok=True)
    corpus = held_out = model = None
    for stage in [s for s in STAGES if s in stages]:
        start = time.time()
        if stage == "captions":
            corpus_lib.write_caption_file(plan.captions_path, plan.captions, CAPTIONS_SEED)
            numbers = {"path": plan.captions_path, "count": plan.captions}
        elif stage == "contextualizer":
            numbers = _contextualizer_stage(plan)
        else:
            if corpus is None:
                corpus = corpus_lib.build(plan.corpus_size, CORPUS_SEED)
                held_out = corpus_lib.build(512, HELD_OUT_SEED)
                print(f"rendered {len(corpus)} training scenes in {time.time() - start:.0f} s")
                model = _load_model(plan)
            model, numbers = {"vae": _vae_stage, "text": _text_stage, "unet": _unet_stage}[stage](
                plan, model, corpus, held_out)
            _save_model(plan, model)
        _record(plan, stage, {**numbers, "devices": jax.local_device_count(),
                              "minutes": round((time.time() - start) / 60, 1)})


def export(plan: Plan, out: str) -> None:
    """The embedded default (see the module docstring) into `out`, replacing what it held."""
    contextualizer = os.path.join(plan.workdir, CONTEXTUALIZER_WORKDIR, pretrain_contextualizer.CONTEXTUALIZER_DIR)
    if not os.path.isdir(contextualizer):
        raise FileNotFoundError(f"{contextualizer}: pretrain the contextualizer first (see --help)")
    model = pretrained_lib.load_pretrained(plan.model_dir)
    staging = out.rstrip("/") + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    pretrained_lib.save_pretrained(os.path.join(staging, "model"), model, dtype=np.float16)
    shutil.rmtree(os.path.join(staging, "model", "tokenizer"))
    shutil.copytree(contextualizer, os.path.join(staging, "contextualizer"))
    tiny.write_pictures(os.path.join(staging, "concept"), seed=1, count=NUM_CONCEPT_PHOTOS, concept=True)
    tiny.write_pictures(os.path.join(staging, "class"), seed=2, count=NUM_CLASS_PICTURES, concept=False)
    readme = os.path.join(out, "README.md")
    if os.path.isfile(readme):
        shutil.copy(readme, staging)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    print(f"wrote the embedded default to {out}")


def _pairs(option: str, text: str) -> tuple[tuple[str, str], ...]:
    """``steps=100,batch_size=8`` -> (("steps", "100"), ("batch_size", "8")): a stage option's value."""
    pairs = tuple(item.partition("=") for item in filter(None, text.split(",")))
    if any(not equals for _, equals, _ in pairs):
        raise SystemExit(f"--{option}={text!r}: give key=value pairs separated by commas")
    return tuple((key, value) for key, _, value in pairs)


def _options(cls, option: str, text: str):
    """``--vae steps=100,batch_size=8`` -> cls(steps=100, batch_size=8), types from the defaults."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in _pairs(option, text):
        if key not in fields:
            raise SystemExit(f"unknown option {key!r}; {cls.__module__} options are {sorted(fields)}")
        values[key] = type(getattr(cls(), key))(value)
    return cls(**values)


def _use_cpu_devices(count: int) -> None:
    """Splits the CPU into `count` devices for the data-parallel steps (:mod:`mlmjax.world.fitting`).

    Only possible before JAX first touches a device: a caller that already has (a test, a notebook)
    keeps its devices, and is told so when their number differs, since the batch split (and so the
    rounding of every step) then differs from the shipped model's."""
    if count < 1:
        raise SystemExit(f"--cpu_devices={count}: give 1 or more")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        have = jax.local_device_count()
        if have != count:
            logging.getLogger(__name__).warning(
                "--cpu_devices=%d ignored: JAX had already started with %d device(s); run the command in a "
                "fresh process to split the CPU", count, have)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--corpus_size", type=int, default=Plan.corpus_size)
    parser.add_argument("--captions", type=int, default=Plan.captions, help="captions for the contextualizer")
    parser.add_argument("--check_prompts", type=int, default=Plan.check_prompts)
    for stage in IMAGE_STAGES:
        parser.add_argument(f"--{stage}", default="", help=f"{stage} stage options, e.g. steps=100,batch_size=8")
    parser.add_argument("--contextualizer", default="",
                        help="overrides of configs/contextualizer.py:world, e.g. max_steps=100,batch_size=8")
    parser.add_argument("--cpu_devices", type=int, default=2,
                        help="CPU devices each step's batch is split over (the shipped model: 2, on 2 cores)")
    parser.add_argument("--export", metavar="DIR", help="write the embedded default from the workdir, run nothing")
    args = parser.parse_args(argv)
    _use_cpu_devices(args.cpu_devices)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {unknown}; choose from {STAGES}")
    plan = Plan(os.path.abspath(args.workdir), args.corpus_size, args.captions, args.check_prompts,
                _options(pretrain_vae.Options, "vae", args.vae), _options(pretrain_text.Options, "text", args.text),
                _options(pretrain_unet.Options, "unet", args.unet),
                # Checked when the stage loads its config: the same errors as mlmjax.train's command line.
                _pairs("contextualizer", args.contextualizer))
    try:
        if args.export:
            export(plan, args.export)
        else:
            run(plan, stages)
    except (OSError, ValueError) as error:  # a missing stage output, an unreadable model folder
        runtime.fail(str(error))


if __name__ == "__main__":
    main()
