r"""Evaluate customized runs as the paper does: sample the DreamBench prompts, score CLIP-T, CLIP-I, DINO.

    python -m mlmjax.evaluate --workdir /tmp/ti --clip /data/clip-vit-base-patch32 --dino /data/dino-vits16
    python -m mlmjax.evaluate --workdir /tmp/ti --workdir /tmp/ti-plain --clip ... --dino ... --out /tmp/compare

Per run (PAPER.md §4): the 25 DreamBench prompts of the concept's kind (``pet`` → living, otherwise
non-living; or ``--prompts FILE``, one ``{}`` template a line), ``--images_per_prompt`` 8 images each
from the run's latest checkpoint (DDPM, 50 steps, guidance 7.5, fixed seed), then

* CLIP-T: image vs. "A photo depicts " + the prompt with the class noun in the slot, ``max(cos, 0)``;
* CLIP-I and DINO: the mean cosine over all (real photo, generated image) pairs;
* text-space metrics (no image model): held-out MLM accuracy of the contextualizer on context prompts
  with the concept, and how much context tokens attend to the concept token (``text_metrics.py``).

Each run's ``WORKDIR/eval/step_<K>/`` receives the images (``images/``, reused by a later evaluation
with the same sampling settings), one grid PNG per prompt (``grids/``), ``results.json`` and
``results.md`` (one row per metric: mean and spread over prompts). With several workdirs, ``--out``
receives ``comparison.md``/``comparison.json``: one row per (method, λ), each metric's mean ± standard
deviation over the runs in it (e.g. seeds). A metric whose model was not given is reported as not
measured, never as a number.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import app, flags
import numpy as np
from PIL import Image

from mlmjax import config as config_lib
from mlmjax.world import captions as world_captions
from mlmjax import data as data_lib
from mlmjax import eval_models
from mlmjax import files
from mlmjax import image_metrics
from mlmjax import runtime
from mlmjax import sample as sample_lib
from mlmjax import sampling
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import workdir as workdir_lib
from mlmjax.prompts import prompt_set, templates

EVAL_DIR = "eval"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
COMPARISON_JSON, COMPARISON_MD = "comparison.json", "comparison.md"
IMAGE_METRICS = ("clip_t", "clip_i", "dino")


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing this module defines none."""
    flags.DEFINE_multi_string("workdir", None, "a training run's workdir (repeat to compare several)", required=True)
    flags.DEFINE_string("clip", None, "a transformers CLIPModel folder (CLIP-T, CLIP-I), e.g. clip-vit-base-patch32")
    flags.DEFINE_string("dino", None, "a transformers ViTModel folder (DINO), e.g. dino-vits16")
    flags.DEFINE_string("contextualizer", None, "the contextualizer that scores text-space metrics "
                        "(default: each run's mlm.contextualizer)")
    flags.DEFINE_string("prompts", None, "living, nonliving, world or a file of {} templates (default: by concept.family)")
    flags.DEFINE_integer("images_per_prompt", 8, "images per prompt", lower_bound=1)
    flags.DEFINE_enum("scheduler", "ddpm", sampling.SCHEDULERS, "the sampler")
    flags.DEFINE_integer("steps", 50, "denoising steps", lower_bound=1)
    flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale")
    flags.DEFINE_integer("seed", 0, "sampling seed (image i of prompt p: key (seed, p, i))", lower_bound=0)
    flags.DEFINE_integer("step", None, "the checkpoint to evaluate (default: the latest)", lower_bound=0)
    flags.DEFINE_string("out", None, "folder for the comparison table (required with several --workdir)")


def prompt_templates(choice: str | None, family: str) -> list[str]:
    """DreamBench's living/nonliving prompts, the world's held-out contexts, a user's file of ``{}``
    templates, or by the concept family."""
    choice = choice or {"pet": "living", "world": "world"}.get(family, "nonliving")
    if choice in ("living", "nonliving"):
        return prompt_set.eval_prompts(choice)
    if choice == "world":
        return world_captions.eval_prompts("{}")
    if not os.path.isfile(choice):
        raise FileNotFoundError(f"--prompts={choice}: neither 'living', 'nonliving', 'world' nor a file of prompt "
                                "templates")
    return list(templates.read_format_lines(choice))


def _sampling_settings(prompts: list[str], *, images_per_prompt: int, scheduler: str, steps: int, guidance: float,
                       seed: int) -> dict:
    return {"prompts": prompts, "num_images": images_per_prompt, "scheduler": scheduler, "steps": steps,
            "guidance": guidance, "seed": seed}


def generated_images(run: workdir_lib.TrainedRun, folder: str, settings: dict) -> np.ndarray:
    """``[P, n, H, W, 3]`` uint8: sampled into ``folder``, or read back if it holds the same sampling."""
    record_path = os.path.join(folder, sample_lib.RECORD_FILE)
    if os.path.isfile(record_path):
        record = files.read_json_object(record_path)
        saved = {"prompts": [p["prompt"] for p in record["prompts"]],
                 **{key: record[key] for key in ("num_images", "scheduler", "steps", "guidance", "seed")}}
        if saved != settings or record.get("checkpoint_step") != run.step:
            raise FileExistsError(f"{folder}: holds images sampled with other settings; delete it to resample")
    else:
        sample_lib.sample_run(run, settings["prompts"], out=folder, num_images=settings["num_images"],
                              scheduler=settings["scheduler"], steps=settings["steps"], guidance=settings["guidance"],
                              seed=settings["seed"])
        record = files.read_json_object(record_path)
    return np.stack([np.stack([np.asarray(Image.open(os.path.join(folder, name)).convert("RGB"))
                               for name in entry["images"]]) for entry in record["prompts"]])


def real_images(run: workdir_lib.TrainedRun) -> np.ndarray:
    """The run's concept photos as uint8, at the run's resolution (the paper resizes them to 512)."""
    resolution = run.config.resolution or run.model.resolution
    return sampling.to_uint8(data_lib.load_images(run.config.concept.images, resolution))


def _summary(per_prompt: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(per_prompt)), "std_over_prompts": float(np.std(per_prompt))}


def score(images: np.ndarray, real: np.ndarray, prompts: list[str], class_noun: str, *,
          clip: eval_models.EvalModel | None, clip_tokenizer: Any, dino: eval_models.EvalModel | None) -> dict:
    """Per-prompt and overall CLIP-T, CLIP-I and DINO of ``images`` ``[P, n, H, W, 3]``."""
    num_prompts, per = images.shape[:2]
    flat = images.reshape(-1, *images.shape[2:])
    per_prompt: dict[str, np.ndarray] = {}
    if clip is not None:
        generated = image_metrics.image_embeddings(clip, flat)
        texts = image_metrics.text_embeddings(clip, clip_tokenizer, image_metrics.clip_t_texts(prompts, class_noun))
        per_prompt["clip_t"] = image_metrics.clip_t(generated, np.repeat(texts, per, axis=0))
        per_prompt["clip_i"] = image_metrics.mean_pairwise_cosine(image_metrics.image_embeddings(clip, real), generated)
    if dino is not None:
        per_prompt["dino"] = image_metrics.mean_pairwise_cosine(image_metrics.image_embeddings(dino, real),
                                                                image_metrics.image_embeddings(dino, flat))
    per_prompt = {name: values.reshape(num_prompts, per).mean(axis=1) for name, values in per_prompt.items()}
    return {"metrics": {name: _summary(values) for name, values in per_prompt.items()},
            "per_prompt": [{"prompt": prompt, **{name: float(values[p]) for name, values in per_prompt.items()}}
                           for p, prompt in enumerate(prompts)]}


def write_grids(images: np.ndarray, folder: str) -> list[str]:
    """One grid PNG per prompt (its images side by side), ``prompt<p>.png``."""
    return [sampling.save_grid(row, folder, columns=row.shape[0], name=f"prompt{p:03d}.png")
            for p, row in enumerate(images)]


def evaluate_run(run: workdir_lib.TrainedRun, *, prompts: list[str], images_per_prompt: int = 8,
                 scheduler: str = "ddpm", steps: int = 50, guidance: float = 7.5, seed: int = 0,
                 clip: eval_models.EvalModel | None = None, dino: eval_models.EvalModel | None = None,
                 contextualizer: str | None = None) -> dict:
    """Samples, scores and writes ``run.workdir/eval/step_<K>/``; returns what ``results.json`` holds."""
    from mlmjax import text_metrics  # heavy to import only where it is used

    out = os.path.join(run.workdir, EVAL_DIR, f"step_{run.step}")
    settings = _sampling_settings(prompts, images_per_prompt=images_per_prompt, scheduler=scheduler, steps=steps,
                                  guidance=guidance, seed=seed)
    images = generated_images(run, os.path.join(out, "images"), settings)
    clip_tokenizer = tokenizer_lib.load_tokenizer(clip.path) if clip is not None else None
    scores = score(images, real_images(run), prompts, run.config.concept.class_noun, clip=clip,
                   clip_tokenizer=clip_tokenizer, dino=dino)
    contextualizer = contextualizer or run.config.mlm.contextualizer
    text = text_metrics.text_metrics(run, contextualizer) if contextualizer else {}
    results = {
        "workdir": os.path.abspath(run.workdir), "step": run.step, "method": run.config.method,
        "mlm_weight": float(run.config.mlm.weight), "seed": int(run.config.seed),
        "concept": run.concept_phrase, "sampling": settings,
        "models": {"clip": clip.path if clip else None, "dino": dino.path if dino else None,
                   "contextualizer": contextualizer or None},
        "metrics": {**scores["metrics"], **{name: {"mean": float(value)} for name, value in text.items()}},
        "not_measured": [name for name, model in (("clip_t", clip), ("clip_i", clip), ("dino", dino)) if model is None],
        "per_prompt": scores["per_prompt"],
    }
    write_grids(images, os.path.join(out, "grids"))
    files.write_json_atomic(os.path.join(out, RESULTS_JSON), results)
    files.write_text_atomic(os.path.join(out, RESULTS_MD), results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    """One row per metric: mean and spread over prompts (or "not measured")."""
    lines = [f"# {results['method']} (λ = {results['mlm_weight']:g}), step {results['step']}", "",
             f"{results['concept']}; {len(results['per_prompt'])} prompts × {results['sampling']['num_images']} images, "
             f"{results['sampling']['scheduler']} {results['sampling']['steps']} steps, guidance "
             f"{results['sampling']['guidance']:g}, seed {results['sampling']['seed']}", "",
             "| metric | mean | spread over prompts (std) |", "|---|---|---|"]
    for name, value in results["metrics"].items():
        spread = value.get("std_over_prompts")
        lines.append(f"| {name} | {value['mean']:.4f} | {'' if spread is None else f'{spread:.4f}'} |")
    lines += [f"| {name} | not measured (no model given) | |" for name in results["not_measured"]]
    return "\n".join(lines) + "\n"


def compare(all_results: Sequence[dict]) -> tuple[list[dict], str]:
    """Groups runs by (method, λ): each metric's mean and standard deviation over the group's runs."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for results in all_results:
        groups.setdefault((results["method"], results["mlm_weight"]), []).append(results)
    names = sorted({name for results in all_results for name in results["metrics"]})
    rows = []
    for (method, weight), members in sorted(groups.items()):
        row = {"method": method, "mlm_weight": weight, "runs": len(members),
               "workdirs": [m["workdir"] for m in members]}
        for name in names:
            values = [m["metrics"][name]["mean"] for m in members if name in m["metrics"]]
            if values:
                row[name] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
        rows.append(row)
    header = "| method | λ | runs | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    for row in rows:
        cells = [f"{row[n]['mean']:.4f} ± {row[n]['std']:.4f}" if n in row else "not measured" for n in names]
        lines.append(f"| {row['method']} | {row['mlm_weight']:g} | {row['runs']} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        runtime.fail(f"unexpected arguments {argv[1:]}")
    runtime.start_command()
    f = flags.FLAGS
    if len(f.workdir) > 1 and not f.out:
        runtime.fail("--out is required with several --workdir (it receives the comparison table)")
    try:
        clip = eval_models.load_clip(f.clip) if f.clip else None
        dino = eval_models.load_dino(f.dino) if f.dino else None
        all_results = []
        for workdir in f.workdir:
            run = workdir_lib.load_trained(workdir, step=f.step)
            prompts = prompt_templates(f.prompts, config_lib.concept_family(run.config))
            results = evaluate_run(run, prompts=prompts, images_per_prompt=f.images_per_prompt,
                                   scheduler=f.scheduler, steps=f.steps, guidance=f.guidance, seed=f.seed,
                                   clip=clip, dino=dino, contextualizer=f.contextualizer)
            print(results_markdown(results))
            all_results.append(results)
        if f.out:
            os.makedirs(f.out, exist_ok=True)
            rows, table = compare(all_results)
            files.write_json_atomic(os.path.join(f.out, COMPARISON_JSON), {"rows": rows})
            files.write_text_atomic(os.path.join(f.out, COMPARISON_MD), table)
            print(table)
    except (ValueError, OSError) as error:
        runtime.fail(str(error))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=runtime.parse_flags)
