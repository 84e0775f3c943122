"""Sampling a trained run: `sample_run` on a run built in memory, and `python -m mlmjax.sample` end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mlmjax import method as method_lib
from mlmjax import sample as sample_lib
from mlmjax import tiny, trainable
from mlmjax import workdir as workdir_lib
from helpers import save_untrained_run
from test_train_step import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(steps=2, num_images=2, batch_size=2, compiler_options={"xla_backend_optimization_level": 0})
PROMPTS = ["a photo of a {} on the beach", "a painting of a <teapot1> teapot"]


def _trained_run(workdir: str) -> workdir_lib.TrainedRun:
    """A TI run as ``load_trained`` returns it, with a random concept vector standing in for training."""
    config = load_config("ti")
    config.mlm.weight = 0.0
    model = tiny.tiny_pretrained()
    built = method_lib.build_state(config, model, contextualizer_folder=None)  # adds <teapot1> to its tokenizer
    state = built.state
    concept = np.random.default_rng(0).standard_normal(state.params["concept"]["embeddings"].shape, np.float32)
    trained = {"concept": {"embeddings": concept}}
    return workdir_lib.TrainedRun(
        workdir=workdir, step=7, config=config, model=model, spec=state.spec,
        params=trainable.merge(trained, state.frozen), trained=trained, concept_tokens=built.concept_tokens,
        concept_phrase=built.concept_phrase)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _trained_run(str(tmp_path_factory.mktemp("run")))


def _bytes(paths):
    return [open(p, "rb").read() for p in paths]


def test_sample_run_writes_images_grid_and_record_reproducibly(run, tmp_path):
    paths = sample_lib.sample_run(run, PROMPTS, out=str(tmp_path / "a"), seed=3, **FAST)
    assert [os.path.basename(p) for p in paths] == [
        "prompt000_0000.png", "prompt000_0001.png", "prompt001_0000.png", "prompt001_0001.png"]
    assert sorted(os.listdir(tmp_path / "a")) == sorted(
        [os.path.basename(p) for p in paths] + ["grid.png", "prompts.txt", "samples.json"])
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape == (2 * 32, 2 * 32, 3)  # one row per prompt, one column per image
    np.testing.assert_array_equal(grid[32:, 32:], np.asarray(Image.open(paths[3])))
    record = json.load(open(tmp_path / "a" / "samples.json"))
    assert record["prompts"][0]["text"] == "a photo of a <teapot1> teapot on the beach"
    assert record["prompts"][1]["text"] == PROMPTS[1]  # no {}: as written
    assert record["prompts"][1]["images"] == ["prompt001_0000.png", "prompt001_0001.png"]
    assert {k: record[k] for k in ("checkpoint_step", "seed", "scheduler", "steps", "guidance")} == {
        "checkpoint_step": 7, "seed": 3, "scheduler": "ddpm", "steps": 2, "guidance": 7.5}
    images = _bytes(paths)
    assert len(set(images)) == 4

    # The same seed gives the same files; a prompt's images do not depend on the prompts after it.
    assert _bytes(sample_lib.sample_run(run, PROMPTS, out=str(tmp_path / "b"), seed=3, **FAST)) == images
    assert _bytes(sample_lib.sample_run(run, PROMPTS[:1], out=str(tmp_path / "c"), seed=3, **FAST)) == images[:2]
    assert _bytes(sample_lib.sample_run(run, PROMPTS[:1], out=str(tmp_path / "d"), seed=4, **FAST))[0] != images[0]

    with pytest.raises(FileExistsError, match="is not empty"):
        sample_lib.sample_run(run, PROMPTS, out=str(tmp_path / "a"), seed=3, **FAST)
    assert sample_lib.new_folder(str(tmp_path / "a")) == str(tmp_path / "a-2")
    assert sample_lib.new_folder(str(tmp_path / "a")) == str(tmp_path / "a-3")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlmjax.sample", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_samples_a_checkpoint_end_to_end(tmp_path):
    workdir = str(tmp_path / "run")
    save_untrained_run(workdir, step=5)
    result = _cli("--workdir", workdir, "--prompt", "a {} in the snow", "--num_images=1", "--steps=2")
    assert result.returncode == 0, result.stderr
    folder = os.path.join(workdir, "samples", "step_5")
    assert sorted(os.listdir(folder)) == ["grid.png", "prompt000_0000.png", "prompts.txt", "samples.json"]
    record = json.load(open(os.path.join(folder, "samples.json")))
    assert record["checkpoint_step"] == 5 and record["prompts"][0]["text"] == "a <teapot1> teapot in the snow"
    assert (record["scheduler"], record["steps"], record["guidance"]) == ("ddpm", 2, 7.5)

    missing = _cli("--workdir", workdir, "--step=9")
    assert missing.returncode == 2 and "no checkpoint at step 9" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr


@pytest.mark.parametrize("args, message", [
    (["--workdir=/nonexistent/run"], "/nonexistent/run: not an mlmjax run"),
    (["--workdir=/tmp", "--num_images=0"], "--num_images=0"),
    (["--workdir=/tmp", "a photo"], "unexpected arguments"),
])
def test_cli_user_errors_are_one_line(args, message):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
