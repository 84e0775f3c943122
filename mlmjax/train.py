r"""Customize Stable Diffusion with one of four baselines, with or without MLM; or pretrain the contextualizer.

    python -m mlmjax.train --config configs/ti.py --workdir /tmp/ti
    python -m mlmjax.train --config configs/ti.py --workdir /tmp/ti-plain --config.mlm.weight=0
    python -m mlmjax.train --config configs/contextualizer.py:tiny --workdir /tmp/ctx

With ``pretrained``, ``concept.images`` and ``mlm.contextualizer`` left empty, the run uses the
embedded tiny default (``mlmjax/assets/tiny``): a small SD-shaped model, its pretrained contextualizer,
and a few photos of a toy teapot. The workdir receives ``config.json``, ``metrics.jsonl`` and, at the
end, ``samples/`` with PNGs of a few context prompts.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from mlmjax import config as config_lib
from mlmjax import data as data_lib
from mlmjax import loop as loop_lib
from mlmjax import method as method_lib
from mlmjax import pretrain_contextualizer
from mlmjax import pretrained as pretrained_lib
from mlmjax import sampling
from mlmjax import tiny
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import train_step as train_step_lib
from mlmjax import trainable

_CONFIG = config_flags.DEFINE_config_file("config", None, "a method config, e.g. configs/ti.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where config, metrics and samples are written")

CONFIG_FILE = "config.json"


def _resolve_embedded(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills the empty data fields with the embedded tiny default's (only if pretrained is empty too)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.pretrained:
        embedded = tiny.embedded_assets()
        config.pretrained = embedded.model
        config.concept.images = config.concept.images or embedded.concept_images
        config.concept.class_noun = config.concept.class_noun or embedded.class_noun
        config.mlm.contextualizer = config.mlm.contextualizer or embedded.contextualizer
        config.prior.images = config.prior.images or embedded.class_images
    return config


def _prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    if os.path.exists(os.path.join(workdir, loop_lib.METRICS_FILE)):
        raise FileExistsError(f"{workdir}: holds a previous run (metrics.jsonl); choose a new --workdir")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True) + "\n")


def _write_samples(setup: method_lib.Setup, config: ml_collections.ConfigDict, workdir: str,
                   params: dict) -> None:
    """A few context prompts with the learned concept, as PNGs and one grid, in ``workdir/samples``."""
    prompts = [p.format(setup.concept_phrase) for p in config.sample_prompts]
    tokenizer = setup.model.tokenizer
    ids = tokenizer_lib.tokenize(tokenizer, prompts).astype(np.int32)
    latent_hw = (config.resolution // setup.model.vae_scale_factor,) * 2
    images = sampling.generate(setup.state.spec, params, setup.model.vae, setup.model.params["vae"], ids,
                               jax.random.key(config.seed), scheduler_config=setup.model.scheduler_config,
                               tokenizer=tokenizer, scheduler="ddim", num_steps=config.sample_steps,
                               guidance_scale=7.5, latent_hw=latent_hw)
    images = sampling.to_uint8(images)
    folder = os.path.join(workdir, "samples")
    sampling.save_images(images, folder, "sample")
    sampling.save_grid(images, folder, columns=len(images))
    with open(os.path.join(folder, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs a customization described by ``config`` in ``workdir``; returns the last logged metrics."""
    config_lib.validate(config)
    config = _resolve_embedded(config)
    model = pretrained_lib.load_pretrained(config.pretrained)
    if not config.concept.images:
        raise ValueError("config.concept.images is empty; point it at a folder of photos of the concept")
    if not config.concept.class_noun:
        raise ValueError("config.concept.class_noun is empty; name the concept's class, e.g. 'dog'")
    config.resolution = config.resolution or model.resolution
    concept_images = data_lib.load_images(config.concept.images, config.resolution)
    class_images = None
    if config.prior.weight:
        if not config.prior.images:
            raise ValueError("config.prior.weight > 0 needs config.prior.images, a folder of class images")
        class_images = data_lib.load_images(config.prior.images, config.resolution)[: config.prior.num_images]
    setup = method_lib.build(config, model, concept_images=concept_images, class_images=class_images,
                             contextualizer_folder=config.mlm.contextualizer or None)
    _prepare_workdir(workdir, config)
    step_fn = jax.jit(train_step_lib.train_step, donate_argnums=0)
    state = loop_lib.train_loop(step_fn, setup.state, setup.make_batch, jax.random.key(config.seed),
                                max_steps=config.max_steps, workdir=workdir, log_every=config.log_every,
                                description=config.method)
    setup.state = state
    if config.sample_prompts:
        _write_samples(setup, config, workdir, trainable.merge(state.params, state.frozen))
    return loop_lib.read_metrics(workdir)[-1]


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with config overrides that name no field (or give a bad value) as one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as error:
        # ml_collections' KeyError text is a repr with escaped quotes and newlines: make it one line.
        message = str(error.args[0] if error.args else error).replace("\\n", " ").replace("\\'", "'")
        message = " ".join(message.replace("'", "").split())
        print(f"error: bad flag or config override: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    try:
        if config.get("method") == "contextualizer":
            pretrain_contextualizer.run(config, workdir)
        else:
            metrics = train(config, workdir)
            print(json.dumps(metrics))
    except (ValueError, OSError, loop_lib.NonFiniteLossError) as error:
        # User errors (bad paths, values, files) get one line and a non-zero exit, no traceback.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
