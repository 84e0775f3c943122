r"""Sample images of a learned concept from a training run's checkpoint.

    python -m mlmjax.sample --workdir /tmp/ti --prompt "a photo of a {} on the beach" --prompt "a {} in the snow"
    python -m mlmjax.sample --workdir /tmp/ti --step 2000 --num_images 4 --scheduler ddim --steps 25 --seed 1

Each prompt's ``{}`` becomes the run's concept phrase (e.g. ``<concept> teapot``); a prompt without ``{}``
is used as written, so ``"a <concept> teapot in the snow"`` works too. Without --prompt, the run's
``sample_prompts``. The defaults are the paper's evaluation sampler: DDPM, 50 steps, guidance 7.5.

Writes into --out, by default ``<workdir>/samples/step_<K>`` (``step_<K>-2``, ``-3``, ... when that
exists; an explicit --out must be new or empty): ``prompt<p>_<i>.png``, ``grid.png`` with one row per
prompt, ``prompts.txt`` and ``samples.json`` (prompts, seed, sampler, checkpoint step, files).

Image i of prompt p has its own noise key, from (seed, p, i): asking for more images or appending
prompts leaves the earlier images as they were (bitwise when the batches line up, otherwise up to
float rounding), and the same command gives the same PNGs.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mlmjax import distributed
from mlmjax import files
from mlmjax import runtime
from mlmjax import sampling
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import workdir as workdir_lib
from mlmjax.noise_schedule import NoiseSchedule


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing this module defines none."""
    flags.DEFINE_string("workdir", None, "a training run's workdir", required=True)
    flags.DEFINE_multi_string("prompt", [], "a prompt; {} is the concept phrase (repeat for several; "
                              "default: the run's sample_prompts)")
    flags.DEFINE_integer("num_images", 8, "images per prompt", lower_bound=1)
    flags.DEFINE_enum("scheduler", "ddpm", sampling.SCHEDULERS, "the sampler")
    flags.DEFINE_integer("steps", 50, "denoising steps", lower_bound=1)
    flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale (1: none)")
    flags.DEFINE_integer("seed", 0, "image i of prompt p is a function of (seed, p, i)", lower_bound=0)
    flags.DEFINE_integer("step", None, "the checkpoint's step (default: the latest)", lower_bound=0)
    flags.DEFINE_string("out", None, "output folder (default: <workdir>/samples/step_<K>)")
    flags.DEFINE_integer("batch_size", 0, "images per jitted call over all devices (0: 8 per device)", lower_bound=0)


RECORD_FILE = "samples.json"


def fill_concept(prompt: str, concept_phrase: str) -> str:
    """The prompt with every ``{}`` replaced by the concept phrase (other braces are left alone)."""
    return prompt.replace("{}", concept_phrase)


def sample_run(run: workdir_lib.TrainedRun, prompts: Sequence[str], *, out: str, num_images: int = 8,
               scheduler: str = "ddpm", steps: int = 50, guidance: float = 7.5, seed: int = 0,
               batch_size: int = 0, compiler_options: dict[str, Any] | None = None) -> list[str]:
    """Samples ``num_images`` images of each prompt from ``run`` and writes them into ``out``.

    ``out`` (created if needed) must be empty: a previous sampling is never overwritten. It receives
    ``prompt<p>_<i>.png``, ``grid.png`` (one row per prompt), ``prompts.txt`` and ``samples.json``,
    written last. Returns the PNG paths, prompt by prompt. ``batch_size`` 0 means 8 per device.

    In a multi-process run every process calls this with the same arguments: they sample together,
    each over its devices, and process 0 alone writes (the others get ``[]``).
    """
    if not prompts:
        raise ValueError("no prompts to sample; pass at least one")
    _require_empty(out)
    texts = [fill_concept(p, run.concept_phrase) for p in prompts]
    images = _sample(run, texts, num_images, scheduler=scheduler, steps=steps, guidance=guidance, seed=seed,
                     batch_size=batch_size or 8 * jax.device_count(), compiler_options=compiler_options)
    if not distributed.is_primary():
        return []
    per_prompt = [sampling.save_images(images[p * num_images:(p + 1) * num_images], out, f"prompt{p:03d}")
                  for p in range(len(texts))]
    sampling.save_grid(images, out, columns=num_images)
    files.write_text_atomic(os.path.join(out, "prompts.txt"), "\n".join(texts) + "\n")
    record = {
        "workdir": os.path.abspath(run.workdir), "checkpoint_step": run.step, "concept_phrase": run.concept_phrase,
        "seed": seed, "scheduler": scheduler, "steps": steps, "guidance": guidance, "num_images": num_images,
        "resolution": images.shape[1],
        "prompts": [{"prompt": prompt, "text": text, "images": [os.path.basename(path) for path in paths]}
                    for prompt, text, paths in zip(prompts, texts, per_prompt)],
    }
    files.write_json_atomic(os.path.join(out, RECORD_FILE), record)  # last: it marks the folder complete
    return [path for paths in per_prompt for path in paths]


def _sample(run: workdir_lib.TrainedRun, texts: list[str], num_images: int, *, scheduler: str, steps: int,
            guidance: float, seed: int, batch_size: int, compiler_options: dict[str, Any] | None) -> np.ndarray:
    """``[len(texts) · num_images, R, R, 3]`` uint8, prompt by prompt, ``batch_size`` images per call."""
    ids = np.repeat(tokenizer_lib.tokenize(run.model.tokenizer, texts).astype(np.int32), num_images, axis=0)
    keys = jnp.concatenate([sampling.image_keys(seed, p, range(num_images)) for p in range(len(texts))])
    total = len(ids)
    batch_size = min(batch_size, total)
    resolution = run.config.resolution or run.model.resolution
    params, vae_params = sampling.place_weights(run.params, run.model.params["vae"])  # once, not per batch
    batches = []
    for start in tqdm(range(0, total, batch_size), desc="sampling", unit="batch", dynamic_ncols=True):
        # The last batch is padded with copies of the last image, so one executable serves all batches.
        index = np.minimum(np.arange(start, start + batch_size), total - 1)
        images = sampling.generate(run.spec, params, run.model.vae, vae_params, ids[index],
                                   keys[index], scheduler_config=run.model.scheduler_config,
                                   latent_hw=(resolution // run.model.vae_scale_factor,) * 2,
                                   tokenizer=run.model.tokenizer, scheduler=scheduler, num_steps=steps,
                                   guidance_scale=guidance, compiler_options=compiler_options)
        batches.append(sampling.to_uint8(images[:total - start]))
    return np.concatenate(batches)


def _require_empty(folder: str) -> None:
    """Refuses an output folder that holds anything: samples are never overwritten."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder}: is a file; choose a new output folder")
    if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder}: is not empty (a previous sampling?); choose a new output folder")


def new_folder(base: str) -> str:
    """Creates and returns ``base``, or ``base-2``, ``base-3``, ...: the first that did not exist."""
    candidate, n = base, 1
    while True:
        try:
            os.makedirs(candidate)  # atomic: two samplers started at once never share a folder
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{base}-{n}"


def _check_steps(run: workdir_lib.TrainedRun, steps: int) -> None:
    limit = NoiseSchedule.from_config(run.model.scheduler_config).num_train_timesteps
    if steps > limit:
        raise ValueError(f"--steps={steps}: the model has {limit} diffusion timesteps; use at most {limit}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        runtime.fail(f"unexpected arguments {argv[1:]}; pass each prompt, quoted, with --prompt")
    runtime.start_command()
    f = flags.FLAGS
    try:
        if f.out:
            _require_empty(f.out)  # before the (slow) model load
        run = workdir_lib.load_trained(f.workdir, step=f.step)
        _check_steps(run, f.steps)
        out = f.out or new_folder(os.path.join(run.workdir, "samples", f"step_{run.step}"))
        paths = sample_run(run, f.prompt or list(run.config.sample_prompts), out=out, num_images=f.num_images,
                           scheduler=f.scheduler, steps=f.steps, guidance=f.guidance, seed=f.seed,
                           batch_size=f.batch_size)
    except (ValueError, OSError) as error:
        runtime.fail(str(error))
    print(f"wrote {len(paths)} images, grid.png and {RECORD_FILE} to {out}")


if __name__ == "__main__":
    runtime.relaunch_with_huge_pages()
    define_flags()
    app.run(main, flags_parser=runtime.parse_flags)
