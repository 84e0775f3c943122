"""``python -m mlmjax.bench_layers`` at the tiny size: both frameworks compute the same layers, and the
rows hold what the table shows."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlmjax import bench_layers


def test_each_layer_is_the_same_computation_in_both_frameworks():
    result = bench_layers.run(bench_layers.select("tiny"), batch=2, warmup=1, repeats=2)
    rows = {row["layer"]: row for row in result["rows"]}
    assert list(rows) == [layer.name for layer in bench_layers.LAYERS["tiny"]]
    for name, row in rows.items():
        assert row["output_rel_difference"] < 1e-5, (name, row["output_rel_difference"])
        for framework in ("jax", "torch"):
            for part in ("forward", "gradient"):
                times = row[f"{framework}_{part}_s"]
                assert len(times) == 2 and all(t > 0 for t in times)
                assert row[f"{framework}_{part}_median_s"] == pytest.approx(np.median(times))
        assert row["gradient_ratio"] == pytest.approx(row["jax_gradient_median_s"] / row["torch_gradient_median_s"])
    # FLOPs: a 3×3 convolution's 2·9·C² per position, attention's two products.
    assert rows["conv_16"]["forward_flops"] == 2 * 2 * 16 * 16 * 9 * 32 * 32
    assert rows["self_attention_64"]["forward_flops"] == 4 * 2 * 1 * 4096 * 4096 * 8
    assert rows["group_norm_silu_16"]["forward_flops"] is None
    table = bench_layers.markdown(result).splitlines()
    assert len(table) == 5 + len(rows) and table[5].startswith("| conv_16 | 16², 32 features | 0.0 |")
    assert "| self_attention_64 | 4096×4096 tokens, 1×8 | 1.1 |" in "\n".join(table)


@pytest.mark.parametrize("name", ["self_attention_64", "conv_16", "group_norm_silu_16"])
def test_the_layers_gradient_is_the_same_in_both_frameworks(name):
    """The timed gradients are of the same function: the JAX and PyTorch input gradients agree (the
    chunked attention's FlashAttention backward pass, the convolution's lean input gradient, against
    PyTorch's autograd)."""
    import jax
    import jax.numpy as jnp
    import torch

    (layer,) = bench_layers.select("tiny", [name])
    arrays = bench_layers._arrays(layer, 1, seed=3)
    inputs = [arrays[name] for name in bench_layers._inputs(layer)]
    weights = {k: jnp.asarray(v) for k, v in bench_layers._weights(layer, arrays).items()}
    function = bench_layers._jax_function(layer)
    argnums = tuple(range(len(inputs)))
    expected = jax.grad(lambda *xs: jnp.sum(function(weights, *xs) ** 2), argnums)(*map(jnp.asarray, inputs))
    torch_function, to_torch = bench_layers._torch_function(layer, arrays)
    leaves = [to_torch(a).requires_grad_(True) for a in inputs]
    got = torch.autograd.grad((torch_function(*leaves) ** 2).sum(), leaves)
    for e, g in zip(expected, got):
        g = bench_layers._channels_last(layer, g.numpy())
        assert np.max(np.abs(np.asarray(e) - g)) / np.max(np.abs(g)) < 1e-5


def test_the_command_writes_its_rows_and_refuses_an_unknown_layer(tmp_path):
    out = tmp_path / "layers.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "mlmjax.bench_layers", "--size=tiny", "--layers=conv_16,geglu_16",
                           "--batch=1", "--repeats=1", f"--json={out}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [row["layer"] for row in json.loads(out.read_text())["rows"]] == ["conv_16", "geglu_16"]
    assert "| geglu_16 | 256 tokens, 32→256 |" in proc.stdout
    refused = subprocess.run([sys.executable, "-m", "mlmjax.bench_layers", "--size=tiny", "--layers=conv_64"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: --layers: unknown layer(s) conv_64 at size tiny; choose from conv_16, self_attention_16, "
        "self_attention_64, cross_attention_16, group_norm_silu_16, geglu_16"], refused.stderr
