"""The benchmark's diffusers-Flax reference (``mlmjax.bench_diffusers_flax``): the same step as mlmjax's.

Its models need diffusers 0.39 and transformers 4.x, which this environment (transformers 5) cannot
hold: the tests that run them use the interpreter ``launch/diffusers_flax_env.sh`` makes
(``$MLMJAX_DIFFUSERS_FLAX_PYTHON``, else that script's default folder; ``.ci/run`` makes it). The
parts that need neither run here: the contextualizer in ``jax.numpy``, the name mapping, the report.
Nothing here asserts a speed.
"""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import relative_error
from mlmjax import bench, bench_diffusers_flax, bench_report, bench_torch, tiny
from mlmjax import config as config_lib

DEFAULT_PYTHON = "/tmp/mlmjax-diffusers-flax/bin/python"


def _interpreter() -> str | None:
    python = os.environ.get("MLMJAX_DIFFUSERS_FLAX_PYTHON") or DEFAULT_PYTHON
    return python if os.access(python, os.X_OK) else None


needs_diffusers_flax = pytest.mark.skipif(
    _interpreter() is None, reason="no diffusers-Flax environment: run launch/diffusers_flax_env.sh (as .ci/run "
    "does) or set MLMJAX_DIFFUSERS_FLAX_PYTHON")


def test_the_contextualizer_in_jax_numpy_is_the_authors_module():
    folder = tiny.embedded_assets().contextualizer
    config, weights, _ = bench_diffusers_flax.load_contextualizer(folder)
    reference = bench_torch.contextualizer_class()(config)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    x = np.random.default_rng(0).standard_normal((3, 77, config["hidden_size"])).astype(np.float32)
    with torch.no_grad():
        expected = reference.encode(torch.from_numpy(x)).numpy()
    features = bench_diffusers_flax.contextualizer_features({k: jnp.asarray(v) for k, v in weights.items()},
                                                            config, jnp.asarray(x))
    assert relative_error(features, expected) < 1e-5
    assert np.abs(expected).mean() > 0.1  # real features, not a degenerate zero


def test_pytorch_names_map_to_diffusers_flax_names():
    key = bench_diffusers_flax._torch_match_key
    assert key("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight") == (
        "unet", "down_blocks_1", "attentions_0", "transformer_blocks_0", "attn2", "to_out_0", "weight")
    assert key("unet", "time_embedding.linear_1.bias") == ("unet", "time_embedding", "linear_1", "bias")
    assert key("unet", "mid_block.resnets.1.norm2.weight") == ("unet", "mid_block", "resnets_1", "norm2", "weight")
    # transformers 5 (and mlmjax) name CLIP's parameters without transformers 4's "text_model".
    assert key("text_encoder", "encoder.layers.0.self_attn.k_proj.weight") == (
        "text_encoder", "text_model", "encoder", "layers", "0", "self_attn", "k_proj", "weight")
    match = bench_diffusers_flax._match_key
    assert match("unet", ("mid_block", "resnets_1", "norm2", "scale")) == key("unet", "mid_block.resnets.1.norm2.weight")
    assert match("text_encoder", ("text_model", "embeddings", "token_embedding", "embedding")) == key(
        "text_encoder", "embeddings.token_embedding.weight")


def test_steps_diffusers_flax_cannot_express_are_reported_as_such():
    assert "own text encoding" in bench_diffusers_flax.unsupported({"layer_tokens": [0, 1], "remat": False})
    assert "gradient checkpointing" in bench_diffusers_flax.unsupported({"layer_tokens": None, "remat": True})
    assert bench_diffusers_flax.unsupported({"layer_tokens": None, "remat": False}) is None


def _row(framework: str, median_ms: float, **fields) -> dict:
    base = {"method": "ti", "mlm": True, "size": "tiny", "compute_dtype": "float32", "repeats": 3, "warmup": 1,
            "remat": False}
    jax_row = fields.pop("jax_row", None)  # what a reference's row takes its batch and FLOPs from
    return bench_report.finish_row({"framework": framework, "times_s": [median_ms / 1000] * 3, **fields}, base,
                                   1e11, jax_row)


def test_the_report_compares_jax_with_each_reference():
    jax_row = _row("jax", 40.0, batch=4, prior_batch=0, mlm_batch=25, flops=2e9, peak_memory_bytes=6e7,
                   trainable_params=32, first_loss={"loss": 1.0, "loss_diff": 0.5})
    torch_row = _row("torch", 50.0, peak_rss_bytes=7e8, trainable_params=32, jax_row=jax_row,
                     first_loss={"loss": 1.000001, "loss_diff": 0.5})
    flax_row = _row("diffusers_flax", 80.0, peak_memory_bytes=1e8, trainable_params=32, jax_row=jax_row,
                    versions={"diffusers": "0.39.0", "transformers": "4.57.6", "jax": "0"}, attention="plain",
                    first_loss={"loss": 1.0, "loss_diff": 0.5001})
    unsupported = dict(_row("diffusers_flax", 1.0, jax_row=jax_row), method="xti", times_s=None, median_ms=None,
                       unsupported="XTI/P+ gives each cross-attention layer its own text encoding")
    for reference in (torch_row, flax_row):
        bench_report.compare(jax_row, reference)
    assert jax_row["time_ratio_jax_over_torch"] == pytest.approx(0.8)
    assert jax_row["time_ratio_jax_over_diffusers_flax"] == pytest.approx(0.5)
    assert jax_row["speedup_over_diffusers_flax"] == pytest.approx(2.0)
    assert jax_row["memory_ratio_jax_over_diffusers_flax"] == pytest.approx(0.6)  # both compiled analyses
    assert jax_row["trainable_params_match_diffusers_flax"] and jax_row["trainable_params_match_torch"]
    assert flax_row["flops"] == 2e9 and flax_row["batch"] == 4  # the JAX row's: the same step
    # Each reference's first loss against JAX's; the JAX row keeps PyTorch's.
    assert flax_row["loss_rel_error"] == pytest.approx(2e-4, rel=1e-3)
    assert jax_row["loss_rel_error"] == pytest.approx(1e-6, rel=1e-3)
    machine = {"cpu": "test cpu", "cores": 2, "load_average": [1.0] * 3, "versions": {"jax": "0"}, "xla_flags": "",
               "date": "today"}
    text = bench_report.markdown({"machine": machine, "matmul_peak": {"flops_per_s": 1e11}, "mlm": [],
                                  "sharded_memory": [], "rows": [jax_row, torch_row, flax_row, unsupported]})
    assert "| JAX/PyTorch time | JAX/diffusers-Flax time | first loss |" in text
    assert "| 0.80 | 0.50 | 1 (Δ 1.0e-06) |" in text
    assert "| – | – | 1 (Δ 2.0e-04) |" in text
    assert "| tiny | xti | on | diffusers_flax | not run: XTI/P+ gives" in text
    assert "diffusers-Flax reference: diffusers 0.39.0, transformers 4.57.6, jax 0; attention: tiny plain." in text
    assert "failed" not in text


def test_a_missing_interpreter_is_a_user_error():
    proc = subprocess.run([sys.executable, "-m", "mlmjax.bench", "--framework=jax,diffusers_flax",
                           "--diffusers_flax_python=/nonexistent/python"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --diffusers_flax_python=/nonexistent/python: not an executable")


@needs_diffusers_flax
def test_the_benchmark_times_diffusers_flax_beside_mlmjax(tmp_path):
    """The driver with the reference: TI with MLM timed and compared."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mlmjax.bench", "--methods=ti", "--mlm=on", "--repeats=2", "--warmup=1",
         "--framework=jax,diffusers_flax", f"--diffusers_flax_python={_interpreter()}", "--peak_repeats=3",
         "--compilation_cache", "--mlm_branch", f"--json={out}", "--markdown"], capture_output=True, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["framework"]: r for r in json.loads(out.read_text())["rows"]}
    jax_row, flax_row = rows["jax"], rows["diffusers_flax"]
    assert len(flax_row["times_s"]) == 2 and flax_row["median_ms"] > 0 and flax_row["compile_s"] > 0
    assert flax_row["versions"]["diffusers"] == "0.39.0" and flax_row["attention"] == "plain"
    assert jax_row["time_ratio_jax_over_diffusers_flax"] > 0 and jax_row["trainable_params_match_diffusers_flax"]
    # diffusers' GEGLU takes flax's tanh-approximated GELU: 2.5e-5 of the first loss at this size.
    assert set(flax_row["first_loss"]) == {"loss", "loss_diff", "loss_mlm"}
    assert flax_row["loss_rel_error"] < 1e-4, (jax_row["first_loss"], flax_row["first_loss"])
    # One device: nothing split, so the compiled step counts about what the lowered one does (the
    # JAX step's vocabulary-chunk loop is counted once, so its compiled count is lower).
    assert flax_row["flops_compiled"] == pytest.approx(flax_row["flops_lowered"], rel=0.05)
    assert jax_row["flops_lowered"] > 0
    # --mlm_branch: the MLM branch alone, compiled on its own, in both frameworks. Timed, never compared
    # with the step here: a test does not fail on wall time (under CI's parallel workers one branch of
    # TI + MLM took 48 ms against its whole step's 42).
    for row in (jax_row, flax_row):
        assert len(row["mlm_branch_times_s"]) == 2 and all(0 < t < math.inf for t in row["mlm_branch_times_s"])
    assert "| tiny | ti | on | diffusers_flax |" in proc.stdout and "JAX/diffusers-Flax time" in proc.stdout


@needs_diffusers_flax
def test_a_step_diffusers_flax_cannot_express_is_reported_not_failed(tmp_path):
    """XTI/P+ through the driver with the reference alone: the JAX side only writes the case folder, and
    the reference's row says why it was not run."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mlmjax.bench", "--methods=xti", "--mlm=off", "--framework=diffusers_flax",
         f"--diffusers_flax_python={_interpreter()}", "--peak_repeats=1", f"--json={out}", "--markdown"],
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["framework"] == "diffusers_flax" and "own text encoding" in row["unsupported"]
    assert "| tiny | xti | off | diffusers_flax | not run: XTI/P+ gives" in proc.stdout


@needs_diffusers_flax
def test_with_the_exact_gelu_diffusers_flax_makes_mlmjaxs_first_step(tmp_path):
    """DreamBooth with MLM (the UNet and the text encoder trained, a prior image, the contextualizer): the
    same weights, batch and draws; with diffusers' GELU made exact, the first losses agree to float32
    rounding, and the trained parameters are the same ones.

    The reference runs data-parallel over 2 devices (``--cpu_devices 2``, what ``mlmjax.bench
    --cpu_devices 2`` gives it), which checks its sharding too: the instance and the class image on a
    device each. The 25 MLM prompts do not divide 2 and stay whole, so each device computes 77% of the
    step's FLOPs (101% of the whole step's lowered count on one device, where nothing is split). The
    one-device reference is the benchmark's default, run in the driver test above."""
    request = tmp_path / bench.REQUEST_JSON
    request.write_text(json.dumps({"method": "dreambooth", "mlm": True, "size": "tiny", "repeats": 1, "warmup": 1,
                                   "compute_dtype": "float32", "configs": config_lib.CONFIGS_DIR,
                                   "count_flops": False}))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    jax_row, error = bench._worker(bench._jax_worker_args("jax", str(request)) + [f"--case={tmp_path}"], env)
    assert error is None, error
    assert jax_row["flops"] is None  # not asked for: the step is not lowered again to count them
    split_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    flax_row, error = bench._worker(["-m", "mlmjax.bench_diffusers_flax", f"--case={tmp_path}", "--warmup=1",
                                     "--repeats=1", "--exact_gelu", "--cpu_devices=2"], split_env,
                                    python=_interpreter())
    assert error is None, error
    assert flax_row["exact_gelu"] and flax_row["cpu_devices"] == 2
    assert flax_row["trainable_params"] == jax_row["trainable_params"] > 3_000_000
    assert set(flax_row["first_loss"]) == {"loss", "loss_diff", "loss_prior", "loss_mlm"}
    for part, value in jax_row["first_loss"].items():
        assert flax_row["first_loss"][part] == pytest.approx(value, rel=2e-5), part
    assert 0.6 < flax_row["flops_compiled"] / flax_row["flops_lowered"] < 0.85, (
        flax_row["flops_compiled"], flax_row["flops_lowered"])


@needs_diffusers_flax
def test_more_devices_than_jax_has_is_a_one_line_error(tmp_path):
    proc = subprocess.run([_interpreter(), "-m", "mlmjax.bench_diffusers_flax", f"--case={tmp_path}",
                           "--cpu_devices=2", f"--out={tmp_path / 'row.json'}"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --cpu_devices=2, but JAX has 1 device(s): start it with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=2 (python -m mlmjax.bench does)")
    assert not (tmp_path / "row.json").exists()
