"""`python -m mlmjax.train` end to end on the embedded default, and its handling of bad input."""

import json
import os
import subprocess
import sys

import pytest

from mlmjax import loop
from mlmjax import train as train_lib
from test_train_step import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ti_with_mlm_runs_end_to_end_on_the_embedded_default(tmp_path):
    config = load_config("ti")
    config.concept.token, config.concept.class_noun = "<concept>", ""  # the embedded default's
    config.max_steps, config.log_every, config.sample_steps = 4, 2, 2
    workdir = str(tmp_path / "run")
    last = train_lib.train(config, workdir)
    rows = loop.read_metrics(workdir)
    assert [row["step"] for row in rows] == [1, 2, 4]
    assert {"loss", "loss_diff", "loss_mlm", "mlm_accuracy", "grad_norm", "lr"} <= set(last)
    assert last["lr"] == pytest.approx(2e-3)
    assert last["loss"] == pytest.approx(last["loss_diff"] + 1e-5 * last["loss_mlm"], rel=1e-5)
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["mlm"]["weight"] == 1e-5 and saved["concept"]["class_noun"] == "teapot"
    samples = sorted(os.listdir(os.path.join(workdir, "samples", "step_4")))
    assert samples == ["grid.png", "prompt000_0000.png", "prompt001_0000.png", "prompt002_0000.png", "prompts.txt",
                       "samples.json"]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]  # checkpoint.every 500: the final one
    assert train_lib.train(config, workdir) == last  # the same command again: already done
    config.seed = 1
    with pytest.raises(ValueError, match="holds another run: config.seed: 7777 there, 1 now"):
        train_lib.train(config, workdir)


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mlmjax.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cpu_devices_split_the_cpu_for_a_data_parallel_step_with_the_same_losses(tmp_path):
    """``--config.mesh.cpu_devices=2``: the step runs on two CPU devices, each with half the batch (and
    the MLM batch of 25 padded to 26 and split), and its losses are the one-device run's to float rounding."""
    common = ["--config", "configs/ti.py", "--config.max_steps=2", "--config.log_every=1", "--config.sample_prompts=()"]
    runs = {}
    for devices in (0, 2):
        workdir = tmp_path / f"devices{devices}"
        result = _run(*common, "--workdir", str(workdir), f"--config.mesh.cpu_devices={devices}")
        assert result.returncode == 0, result.stderr[-2000:]
        runs[devices] = (result.stderr, loop.read_metrics(str(workdir)))
    assert "train step on data=1 fsdp=1 tensor=1 (1 cpu device):" in runs[0][0]
    assert "train step on data=2 fsdp=1 tensor=1 (2 cpu devices):" in runs[2][0]
    for one, two in zip(runs[0][1], runs[2][1], strict=True):
        for key in ("loss", "loss_diff", "loss_mlm", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), (one["step"], key)


def test_the_cli_starts_without_the_libraries_it_needs_only_later():
    """A mistyped flag is answered before transformers (the tokenizer's) loads: it and scipy.stats (which
    the MLM bound no longer needs, test_mlm) took 3 s of the 5.7 s that importing mlmjax.train took (a
    busy 2-core box, session 31)."""
    heavy = ("transformers", "scipy.stats", "torch", "tensorflow", "diffusers")
    code = f"import sys, mlmjax.train; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0 and result.stdout.strip() == "[]", (result.stdout, result.stderr[-2000:])


@pytest.mark.parametrize("flags, message", [
    (["--config.mlm.wieght=0"], "wieght"),
    (["--config.max_steps=0"], "config.max_steps=0: must be a positive integer"),
    (["--config.mesh.cpu_devices=-1"], "config.mesh.cpu_devices=-1: give a number of CPU devices, or 0 for one"),
    (["--config.concept.images=/nonexistent/photos"], "/nonexistent/photos: image folder not found"),
    (["--config.pretrained=/nonexistent/sd"], "/nonexistent/sd: folder not found"),
    (["--config.concept.token=dog"], "concept token 'dog' is already in the tokenizer's vocabulary"),
])
def test_bad_input_gets_one_line_and_a_nonzero_exit(tmp_path, flags, message):
    workdir = tmp_path / "run"
    result = _run("--config", "configs/ti.py", "--workdir", str(workdir), *flags)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()  # nothing written


def _bad_photo_folder(root, kind: str) -> str:
    """A folder of good embedded photos plus one bad file of ``kind`` (or just empty)."""
    import shutil

    from PIL import Image

    from mlmjax import tiny

    folder = root / kind
    if kind == "empty":
        folder.mkdir()
        return str(folder)
    shutil.copytree(tiny.embedded_assets().concept_images, folder)
    good = (folder / "concept_00.png").read_bytes()
    if kind == "truncated":
        (folder / "broken.png").write_bytes(good[: len(good) // 2])
    elif kind == "not_an_image":
        (folder / "notes.jpg").write_text("these are my notes, not a photo")
    elif kind == "small":
        Image.new("RGB", (16, 24), "red").save(folder / "thumbnail.png")
    return str(folder)


def _mismatched_model(root) -> str:
    """The embedded model with a UNet config that its weights do not fit."""
    import shutil

    from mlmjax import tiny

    folder = root / "model"
    shutil.copytree(tiny.embedded_assets().model, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("case, message", [
    ("empty", "empty: no images (.jpg, .jpeg, .png, .webp, .bmp) in the folder"),
    ("truncated", "broken.png: corrupt or truncated image"),
    ("not_an_image", "notes.jpg: not an image file"),
    ("small", "thumbnail.png: 16x24 pixels is smaller than the training resolution 32x32"),
    ("mismatched_model", "unet"),
    ("sample_prompt_without_slot", "config.sample_prompts=('a painting',): prompt 0 ('a painting') needs a {} slot"),
    ("prior_prompt_without_slot", "config.prior.prompt='a picture': needs a {} slot"),
    ("negative_steps", "config.max_steps=-5: must be a positive integer"),
    ("not_a_run", "is not empty and holds no mlmjax run"),
])
def test_every_bad_input_is_one_clear_error_before_anything_is_written(tmp_path, case, message):
    """In process (the CLI turns each of these ValueErrors into one line and exit status 2, as the
    subprocess test above shows): the error names the file or key, and the workdir is untouched."""
    config = load_config("ti")
    config.concept.token, config.concept.class_noun = "<concept>", ""
    workdir = tmp_path / "run"
    if case in ("empty", "truncated", "not_an_image", "small"):
        config.concept.images = _bad_photo_folder(tmp_path, case)
    elif case == "mismatched_model":
        from mlmjax import tiny

        embedded = tiny.embedded_assets()
        config.pretrained = _mismatched_model(tmp_path)
        config.concept.images, config.concept.class_noun = embedded.concept_images, embedded.class_noun
        config.mlm.contextualizer = embedded.contextualizer
    elif case == "sample_prompt_without_slot":
        config.sample_prompts = ("a painting",)
    elif case == "prior_prompt_without_slot":
        config.prior.prompt = "a picture"
    elif case == "negative_steps":
        config.max_steps = -5
    elif case == "not_a_run":
        workdir.mkdir()
        (workdir / "thesis.tex").write_text("keep me")
    before = sorted(p.name for p in workdir.iterdir()) if workdir.exists() else None
    with pytest.raises(ValueError) as error:
        train_lib.train(config, str(workdir))
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert (sorted(p.name for p in workdir.iterdir()) if workdir.exists() else None) == before
