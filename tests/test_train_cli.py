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
    samples = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert samples == ["grid.png", "prompts.txt", "sample_0000.png", "sample_0001.png", "sample_0002.png"]
    with pytest.raises(FileExistsError, match="holds a previous run"):
        train_lib.train(config, workdir)


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mlmjax.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("flags, message", [
    (["--config.mlm.wieght=0"], "wieght"),
    (["--config.max_steps=0"], "config.max_steps=0: must be a positive integer"),
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
