"""`python -m mlmjax.evaluate`: CLIP-T, CLIP-I and DINO on tiny random CLIP/DINO stand-ins, the files it
writes, the comparison table, and its errors.

The stand-ins are real transformers models (random weights) saved as folders, so the command runs
exactly as on clip-vit-base-patch32 and dino-vits16; `tests/test_vit.py` checks the ports themselves
against PyTorch.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from mlmjax import eval_models
from mlmjax import evaluate as evaluate_lib
from mlmjax import image_metrics
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import workdir as workdir_lib
from helpers import save_untrained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a {} in the snow", "a red {}"]
pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """Folders of a tiny CLIPModel (real vocabulary) and a tiny DINO-like ViTModel, random weights."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=49408,
                max_position_embeddings=77)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    folders = {"clip": str(tmp_path_factory.mktemp("clip")), "dino": str(tmp_path_factory.mktemp("dino"))}
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
                           ).save_pretrained(folders["clip"], safe_serialization=True)
    transformers.ViTModel(transformers.ViTConfig(**vision), add_pooling_layer=False
                          ).save_pretrained(folders["dino"], safe_serialization=True)
    return folders


def test_scores_are_the_paper_formulas_on_the_models_embeddings(stand_ins):
    clip, dino = eval_models.load_clip(stand_ins["clip"]), eval_models.load_dino(stand_ins["dino"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 32, 32, 3), dtype=np.uint8)  # 2 prompts × 3 images
    real = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    tokenizer = tokenizer_lib.vendored_tokenizer()
    scores = evaluate_lib.score(images, real, PROMPTS, "teapot", clip=clip, clip_tokenizer=tokenizer, dino=dino)

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    flat = images.reshape(6, 32, 32, 3)
    ids = tokenizer_lib.tokenize(tokenizer, ["A photo depicts a teapot in the snow", "A photo depicts a red teapot"])
    image_clip = unit(eval_models.image_embeddings(clip, flat))
    text_clip = unit(eval_models.text_embeddings(clip, ids))
    clip_t = np.maximum((image_clip.reshape(2, 3, -1) * text_clip[:, None]).sum(-1), 0).mean(1)
    clip_i = (image_clip @ unit(eval_models.image_embeddings(clip, real)).T).reshape(2, 3, 4).mean((1, 2))
    dino_score = (unit(eval_models.image_embeddings(dino, flat))
                  @ unit(eval_models.image_embeddings(dino, real)).T).reshape(2, 3, 4).mean((1, 2))
    for name, expected in (("clip_t", clip_t), ("clip_i", clip_i), ("dino", dino_score)):
        got = [row[name] for row in scores["per_prompt"]]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        assert scores["metrics"][name]["mean"] == pytest.approx(expected.mean(), rel=1e-5, abs=1e-6)
        assert scores["metrics"][name]["std_over_prompts"] == pytest.approx(expected.std(), rel=1e-4, abs=1e-6)
    assert all(0 <= row["clip_t"] <= 1 for row in scores["per_prompt"])

    # A generated set equal to the real photos scores CLIP-I = the mean of the real photos' Gram matrix.
    same = evaluate_lib.score(real[None, :, :32, :32], real[:, :32, :32], PROMPTS[:1], "teapot", clip=clip,
                              clip_tokenizer=tokenizer, dino=None)
    gram = unit(eval_models.image_embeddings(clip, real[:, :32, :32]))
    assert same["metrics"]["clip_i"]["mean"] == pytest.approx((gram @ gram.T).mean(), rel=1e-5)
    assert "dino" not in same["metrics"]


def test_clip_t_texts_use_the_class_noun():
    assert image_metrics.clip_t_texts(["a {} in the jungle", "a cube shaped {}"], "duck toy") == [
        "A photo depicts a duck toy in the jungle", "A photo depicts a cube shaped duck toy"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlmjax.evaluate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_evaluates_runs_end_to_end_and_compares_them(stand_ins, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two of DreamBench's\n" + "\n".join(PROMPTS) + "\n")
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for seed, workdir in enumerate(runs):
        save_untrained_run(workdir, step=3, perturb_seed=seed)
    out = str(tmp_path / "compare")
    common = ["--clip", stand_ins["clip"], "--dino", stand_ins["dino"], "--prompts", str(prompts),
              "--images_per_prompt=2", "--steps=2", "--out", out]
    result = _cli(*[arg for workdir in runs for arg in ("--workdir", workdir)], *common)
    assert result.returncode == 0, result.stderr[-3000:]

    folder = os.path.join(runs[0], "eval", "step_3")
    assert sorted(os.listdir(folder)) == ["grids", "images", "results.json", "results.md"]
    assert sorted(os.listdir(os.path.join(folder, "grids"))) == ["prompt000.png", "prompt001.png"]
    results = json.load(open(os.path.join(folder, "results.json")))
    assert results["method"] == "ti" and results["step"] == 3 and results["not_measured"] == []
    assert [row["prompt"] for row in results["per_prompt"]] == PROMPTS
    assert {"clip_t", "clip_i", "dino"} <= set(results["metrics"])

    # The numbers are score() of the images it wrote and the run's photos.
    run = workdir_lib.load_trained(runs[0])
    images = evaluate_lib.generated_images(run, os.path.join(folder, "images"), results["sampling"])
    assert images.shape == (2, 2, 32, 32, 3)
    again = evaluate_lib.score(images, evaluate_lib.real_images(run), PROMPTS, "teapot",
                               clip=eval_models.load_clip(stand_ins["clip"]),
                               clip_tokenizer=tokenizer_lib.vendored_tokenizer(),
                               dino=eval_models.load_dino(stand_ins["dino"]))
    for name in ("clip_t", "clip_i", "dino"):
        assert results["metrics"][name]["mean"] == pytest.approx(again["metrics"][name]["mean"], rel=1e-5)

    table = open(os.path.join(out, "comparison.md")).read()
    rows = json.load(open(os.path.join(out, "comparison.json")))["rows"]
    assert len(rows) == 1 and rows[0]["runs"] == 2 and rows[0]["method"] == "ti"
    means = [json.load(open(os.path.join(w, "eval", "step_3", "results.json")))["metrics"]["dino"]["mean"] for w in runs]
    assert rows[0]["dino"]["mean"] == pytest.approx(np.mean(means)) and rows[0]["dino"]["std"] == pytest.approx(np.std(means))
    assert table.splitlines()[0].startswith("| method | λ | runs |")

    # Other sampling settings in the same folder are refused, not mixed in.
    clash = _cli("--workdir", runs[0], "--prompts", str(prompts), "--images_per_prompt=3", "--steps=2")
    assert clash.returncode == 2 and "holds images sampled with other settings" in clash.stderr
    assert len(clash.stderr.strip().splitlines()) == 1


def test_compare_groups_by_method_and_lambda():
    def result(method, weight, clip_t):
        return {"method": method, "mlm_weight": weight, "workdir": f"/{method}{weight}{clip_t}",
                "metrics": {"clip_t": {"mean": clip_t}}}

    rows, table = evaluate_lib.compare([result("ti", 1e-5, 0.3), result("ti", 1e-5, 0.5), result("ti", 0.0, 0.2)])
    assert [(r["mlm_weight"], r["runs"]) for r in rows] == [(0.0, 1), (1e-5, 2)]
    assert rows[1]["clip_t"] == {"mean": pytest.approx(0.4), "std": pytest.approx(0.1), "n": 2}
    assert "| ti | 1e-05 | 2 | 0.4000 ± 0.1000 |" in table


def test_prompt_choices_and_bad_prompt_files(tmp_path):
    assert len(evaluate_lib.prompt_templates(None, "pet")) == 25
    assert evaluate_lib.prompt_templates(None, "nonliving") == evaluate_lib.prompt_templates("nonliving", "pet")
    world = evaluate_lib.prompt_templates(None, "world")  # the world's held-out contexts
    assert len(world) == 58 and world == evaluate_lib.prompt_templates("world", "pet")
    assert all(p.count("{}") == 1 for p in world) and "{} on the beach" not in world
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of my dog\n")
    with pytest.raises(ValueError, match="bad.txt:1: expected exactly one"):
        evaluate_lib.prompt_templates(str(bad), "pet")
    with pytest.raises(FileNotFoundError, match="--prompts=nope"):
        evaluate_lib.prompt_templates("nope", "pet")
