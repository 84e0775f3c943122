"""A small CNN that reads a world picture's ground truth back: object (the concept is its own class),
colour, background, worn item and its colour, relation, second object and its colour, style.

It scores what a text-to-image model generated for a prompt: did the image show the asked context
(`prompt_fidelity`, `context_fidelity`), and is the subject the concept (`concept_probability`)?
Trained on freshly rendered scenes, the concept in every context included, with mild colour jitter,
noise and blur, because a tiny diffusion model's samples are blurrier than renders.

Images: uint8 [N, 32, 32, 3] (as `render` gives them), or floats in [-1, 1] (as a diffusion model's
decoder gives them). The shipped weights live in `assets/evaluator/` (safetensors + config.json).

    python -m mlmjax.world.evaluator --train --out DIR   # trains, prints held-out accuracy
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from mlmjax import files, weights
from mlmjax.world import scene as scene_lib
from mlmjax.world.render import SIZE, render_batch
from mlmjax.world.scene import ATTRIBUTES, CONCEPT, CONTEXT_ATTRIBUTES, Scene

DEFAULT_DIR = Path(__file__).parent / "assets" / "evaluator"
WEIGHTS_FILE = "evaluator.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
IGNORE = -1  # label of an attribute that does not apply (the concept's colour, ...)

TRAIN_SEED = 0
EVAL_SEED = 12345  # held-out scenes: a seed training never uses


class EvaluatorError(ValueError):
    """An evaluator folder is missing or does not match the model; the message names the file."""


class WorldClassifier(nn.Module):
    """Conv stacks at 32, 16 and 8 px, a dense layer over the 4x4 map (position matters: relations),
    one logit head per attribute."""

    heads: tuple[tuple[str, int], ...]
    # (features, convs) per scale. Wide and shallow learns fastest per CPU second of the shapes tried.
    stages: tuple[tuple[int, int], ...] = ((48, 1), (96, 1), (192, 1))
    hidden: int = 192

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        for features, convs in self.stages:
            for _ in range(convs):
                x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        return {name: nn.Dense(n, name=f"head_{name}")(x) for name, n in self.heads}


def model_from_config(config: dict) -> WorldClassifier:
    heads = tuple((name, len(classes)) for name, classes in config["heads"].items())
    stages = tuple((int(f), int(c)) for f, c in config["stages"])
    return WorldClassifier(heads, stages=stages, hidden=int(config["hidden"]))


def default_config(stages: Sequence[Sequence[int]] = WorldClassifier.stages,
                   hidden: int = WorldClassifier.hidden) -> dict:
    return {"heads": {k: list(v) for k, v in ATTRIBUTES.items()}, "stages": [list(s) for s in stages],
            "hidden": hidden,
            "image_size": SIZE, "input": "RGB, NHWC, floats in [-1, 1] (uint8 is converted)"}


def labels(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """Class indices per attribute, `IGNORE` where the attribute is unspecified or does not apply."""
    return {name: np.asarray([IGNORE if getattr(s, name) is None else classes.index(getattr(s, name))
                              for s in scenes], np.int32)
            for name, classes in ATTRIBUTES.items()}


def to_float(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float [-1, 1]; floats are taken to be in [-1, 1] already."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


# --- training ----------------------------------------------------------------------------------------

def blur(images: jax.Array) -> jax.Array:
    """A 3x3 binomial blur of float images [N, H, W, C] (edge pixels repeated outside)."""
    kernel = jnp.outer(jnp.array([1.0, 2.0, 1.0]), jnp.array([1.0, 2.0, 1.0])) / 16.0
    n, h, w, c = images.shape
    padded = jnp.pad(images.transpose(0, 3, 1, 2).reshape(-1, 1, h, w), ((0, 0), (0, 0), (1, 1), (1, 1)),
                     mode="edge")
    out = jax.lax.conv_general_dilated(padded, kernel[None, None], (1, 1), "VALID")
    return out.reshape(n, c, h, w).transpose(0, 2, 3, 1)


def augment(rng: jax.Array, x: jax.Array) -> jax.Array:
    """Mild, label-preserving corruption: blur (half the images), colour gain/offset, noise."""
    k_blur, k_mix, k_gain, k_off, k_noise, k_sigma = jax.random.split(rng, 6)
    n = x.shape[0]
    mix = jax.random.uniform(k_mix, (n, 1, 1, 1)) * jax.random.bernoulli(k_blur, 0.5, (n, 1, 1, 1))
    x = (1 - mix) * x + mix * blur(x)
    x = x * jax.random.uniform(k_gain, (n, 1, 1, 3), minval=0.9, maxval=1.1)
    x = x + jax.random.uniform(k_off, (n, 1, 1, 3), minval=-0.06, maxval=0.06)
    sigma = jax.random.uniform(k_sigma, (n, 1, 1, 1), maxval=0.08)
    return jnp.clip(x + sigma * jax.random.normal(k_noise, x.shape), -1.0, 1.0)


def loss_fn(params, model: WorldClassifier, images: jax.Array, targets: dict[str, jax.Array]):
    """Sum over heads of the mean cross-entropy over the images where the head applies."""
    logits = model.apply({"params": params}, images)
    total, accuracy = 0.0, {}
    for name, target in targets.items():
        valid = target != IGNORE
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[name], jnp.maximum(target, 0))
        count = jnp.maximum(valid.sum(), 1)
        total = total + jnp.where(valid, ce, 0.0).sum() / count
        accuracy[name] = jnp.where(valid, logits[name].argmax(-1) == target, False).sum() / count
    return total, accuracy


def make_train_step(model: WorldClassifier, tx: optax.GradientTransformation):
    @jax.jit
    def step(params, opt_state, rng, images, targets):
        images = augment(rng, to_float(images))
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model, images, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def training_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """World scenes with the concept as one more object kind, in every context."""
    return scene_lib.sample_scenes(rng, n, include_concept=True)


@dataclasses.dataclass
class TrainResult:
    params: dict
    config: dict
    recipe: dict  # the train() arguments, to reproduce the weights
    losses: list[float]
    seconds: float


def train(*, steps: int = 3000, batch_size: int = 64, n_train: int = 60000, seed: int = TRAIN_SEED,
          learning_rate: float = 3e-3, stages: Sequence[Sequence[int]] = WorldClassifier.stages,
          hidden: int = WorldClassifier.hidden, log_every: int = 250,
          log=print) -> TrainResult:
    """Renders `n_train` scenes once, then trains for `steps` Adam steps on random augmented batches."""
    start = time.time()
    rng = np.random.default_rng(seed)
    scenes = training_scenes(rng, n_train)
    images = render_batch(scenes)
    targets = labels(scenes)
    log(f"rendered {n_train} training scenes in {time.time() - start:.0f}s")
    config = default_config(stages, hidden)
    model = model_from_config(config)
    params = model.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(200, steps // 10 + 1), steps)
    tx = optax.adam(schedule)
    opt_state = tx.init(params)
    step_fn = make_train_step(model, tx)
    key = jax.random.key(seed + 1)
    losses = []
    for i in range(steps):
        idx = rng.integers(0, n_train, batch_size)
        batch = {k: v[idx] for k, v in targets.items()}
        params, opt_state, loss = step_fn(params, opt_state, jax.random.fold_in(key, i), images[idx], batch)
        losses.append(float(loss))
        if log_every and (i + 1) % log_every == 0:
            log(f"step {i + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} ({time.time() - start:.0f}s)")
    recipe = {"steps": steps, "batch_size": batch_size, "n_train": n_train, "seed": seed,
              "learning_rate": learning_rate}
    return TrainResult(params, config, recipe, losses, time.time() - start)


# --- the loaded evaluator --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A trained classifier; `predict` and `score` take uint8 or [-1, 1] float images [N, 32, 32, 3]."""

    model: WorldClassifier
    params: dict
    config: dict

    def __post_init__(self) -> None:
        object.__setattr__(self, "_apply", jax.jit(lambda p, x: self.model.apply({"params": p}, x)))

    def probabilities(self, images, batch_size: int = 512) -> dict[str, np.ndarray]:
        """Softmax probabilities per attribute: name -> [N, classes] (class order: `ATTRIBUTES`)."""
        chunks = []
        for i in range(0, len(images), batch_size):
            logits = self._apply(self.params, to_float(images[i:i + batch_size]))
            chunks.append({k: np.asarray(jax.nn.softmax(v)) for k, v in logits.items()})
        return {k: np.concatenate([c[k] for c in chunks]) for k in self.config["heads"]}

    def predict(self, images) -> dict[str, list[str]]:
        """The most likely value of every attribute, per image."""
        probs = self.probabilities(images)
        return {k: [self.config["heads"][k][i] for i in p.argmax(-1)] for k, p in probs.items()}

    def score(self, images, scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
        """How well each image shows its (possibly partial) scene, e.g. a prompt's
        `scene_from_prompt`. Returns, per image:

        - ``match/<attribute>``: 1.0 if the predicted value is the asked one, 0.0 if not, NaN if the
          scene does not ask (an unspecified attribute; asking "none" counts);
        - ``prompt_fidelity``: the fraction of all asked attributes shown;
        - ``context_fidelity``: the same over context attributes only (not object and colour);
        - ``concept_probability``: the probability the subject is the concept; ``is_concept``: 1.0
          when the concept is the most likely object.
        """
        if len(images) != len(scenes):
            raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
        probs = self.probabilities(images)
        asked = labels(scenes)
        out = {}
        for name, target in asked.items():
            hit = (probs[name].argmax(-1) == target).astype(np.float64)
            out[f"match/{name}"] = np.where(target == IGNORE, np.nan, hit)
        matches = np.stack([out[f"match/{n}"] for n in ATTRIBUTES], axis=1)
        context = np.stack([out[f"match/{n}"] for n in CONTEXT_ATTRIBUTES], axis=1)
        with warnings.catch_warnings():  # nothing asked -> NaN fidelity; numpy's warning is noise
            warnings.simplefilter("ignore", RuntimeWarning)
            out["prompt_fidelity"] = np.nanmean(matches, axis=1)
            out["context_fidelity"] = np.nanmean(context, axis=1)
        concept = ATTRIBUTES["object"].index(CONCEPT)
        out["concept_probability"] = probs["object"][:, concept]
        out["is_concept"] = (probs["object"].argmax(-1) == concept).astype(np.float64)
        return out


def save(folder: str | Path, result: TrainResult, metrics: dict) -> None:
    """Weights (float16 safetensors, to stay small), config.json (architecture, classes, training
    facts, held-out accuracy) and metrics.json."""
    os.makedirs(folder, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(result.params), sep="/")
    weights.write_safetensors(os.path.join(folder, WEIGHTS_FILE),
                              {k: np.asarray(v, np.float16) for k, v in flat.items()})
    training = dict(result.recipe, seconds=round(result.seconds), final_loss=float(np.mean(result.losses[-100:])))
    config = dict(result.config, heldout_accuracy=metrics["clean"], training=training)
    files.write_json_atomic(os.path.join(folder, CONFIG_FILE), config)
    files.write_json_atomic(os.path.join(folder, METRICS_FILE), metrics)


def load_evaluator(path: str | Path = DEFAULT_DIR) -> Evaluator:
    """Loads an evaluator folder (config.json + evaluator.safetensors); never unpickles.

    Raises `EvaluatorError` with one line naming the file when something is missing or does not fit.
    """
    path = str(path)
    if not os.path.isdir(path):
        raise EvaluatorError(f"{path}: evaluator folder not found")
    config_path = os.path.join(path, CONFIG_FILE)
    config = files.read_json_object(config_path, EvaluatorError, "re-train with --train --out")
    try:
        heads = {k: tuple(v) for k, v in config["heads"].items()}
        model = model_from_config(config)
    except (KeyError, TypeError, AttributeError) as problem:
        raise EvaluatorError(f"{config_path}: malformed evaluator config ({problem!r})") from None
    if heads != ATTRIBUTES:
        raise EvaluatorError(f"{config_path}: its classes differ from this world's vocabulary; "
                             "re-train the evaluator")
    try:
        tensors, weights_path = weights.read_safetensors(path, WEIGHTS_FILE)
    except weights.WeightsError as problem:
        raise EvaluatorError(str(problem)) from None
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    expected = traverse_util.flatten_dict(abstract, sep="/")
    for key in sorted(set(expected) ^ set(tensors)):
        what = "missing" if key in expected else "unexpected"
        raise EvaluatorError(f"{weights_path}: {what} tensor {key!r}; re-train the evaluator")
    for key, leaf in expected.items():
        if tuple(tensors[key].shape) != tuple(leaf.shape):
            raise EvaluatorError(f"{weights_path}: tensor {key!r} has shape {tensors[key].shape}, "
                                 f"expected {leaf.shape}")
    params = traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in tensors.items()}, sep="/")
    return Evaluator(model, params, config)


# --- held-out accuracy -------------------------------------------------------------------------------

def heldout_accuracy(evaluator: Evaluator, n: int = 2000, seed: int = EVAL_SEED,
                     blurred: bool = False) -> dict[str, float]:
    """Accuracy per attribute on `n` fresh scenes from `seed` (where the attribute applies);
    `blurred` first smooths the images with a 3x3 binomial filter, as a stand-in for generated images."""
    scenes = training_scenes(np.random.default_rng(seed), n)
    images = to_float(render_batch(scenes))
    if blurred:
        images = blur(images)
    scores = evaluator.score(images, scenes)
    return {k: float(np.nanmean(scores[f"match/{k}"])) for k in ATTRIBUTES}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train or check the world evaluator.")
    parser.add_argument("--train", action="store_true", help="train and write DIR")
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="evaluator folder (default: shipped)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--n-train", type=int, default=60000)
    parser.add_argument("--n-eval", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.train:
        result = train(steps=args.steps, n_train=args.n_train)
        evaluator = Evaluator(model_from_config(result.config), result.params, result.config)
    else:
        evaluator = load_evaluator(args.out)
    metrics = {"clean": heldout_accuracy(evaluator, args.n_eval),
               "blurred": heldout_accuracy(evaluator, args.n_eval, blurred=True),
               "n_eval": args.n_eval, "eval_seed": EVAL_SEED}
    if args.train:
        metrics["train_seconds"] = round(result.seconds)
        save(args.out, result, metrics)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
