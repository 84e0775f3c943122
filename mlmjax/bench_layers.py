r"""Stable Diffusion's heaviest layers timed one at a time: mlmjax's JAX layers against the PyTorch
operations diffusers runs, forward and forward with the input's gradient, on the same inputs and weights.

    python -m mlmjax.bench_layers                                # SD 1.5's layers at TI's batch 4
    python -m mlmjax.bench_layers --layers self_attention_64,conv_64 --repeats 5 --json layers.json

A step of ``python -m mlmjax.bench`` says how much slower or faster one framework is; this says where.
Each layer takes the input's gradient only, its weights frozen: the UNet's layers in Textual Inversion,
XTI/P+ and (but for the cross-attention projections) Custom Diffusion. The attention layers start from
the projected queries, keys and values (``[B, L, heads, head_dim]``), so they time the attention itself:
mlmjax's ``dot_product_attention`` (chunked above 2^18 scores, with FlashAttention's backward pass)
against ``torch.nn.functional.scaled_dot_product_attention``, which diffusers' ``AttnProcessor2_0``
calls. Convolutions are ``torch.nn.functional.conv2d`` on channels-first tensors, as diffusers runs
them. The JAX layers are compiled with XLA's own CPU kernels, as the SD 1.5 steps are
(``mlmjax.aot.xla_kernel_options``).

Both frameworks run in this one process, a layer at a time, JAX first, with malloc's huge pages as the
JAX steps of ``python -m mlmjax.bench`` get them (``mlmjax.runtime.relaunch_with_huge_pages``; here
PyTorch's operations share them): each layer's row is its medians
over ``--repeats`` calls after ``--warmup``, the JAX/PyTorch time ratios, the forward's FLOPs (where
the layer is products) and the largest difference between the two outputs relative to the largest
output element (the check that both compute the same layer).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import sys
from typing import Any, Callable

import numpy as np
from absl import app, flags

SIZES = ("sd15", "tiny")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer's shapes: ``kind`` is conv (3×3, ``side``² positions, ``features`` in and out), attention
    (``tokens`` queries over ``context`` keys, ``heads`` of ``head_dim``), group_norm_silu (``groups``,
    ``side``², ``features``) or dense (``tokens`` rows, ``features`` in, ``out_features`` out)."""

    name: str
    kind: str
    side: int = 0
    features: int = 0
    out_features: int = 0
    tokens: int = 0
    context: int = 0
    heads: int = 0
    head_dim: int = 0
    groups: int = 32

    def forward_flops(self, batch: int) -> float | None:
        if self.kind == "conv":
            return 2.0 * batch * self.side**2 * 9 * self.features * self.features
        if self.kind == "attention":  # q·kᵀ and the weights' product with v
            return 4.0 * batch * self.heads * self.tokens * self.context * self.head_dim
        if self.kind == "dense":
            return 2.0 * batch * self.tokens * self.features * self.out_features
        return None


def _conv(name, side, features):
    return Layer(name, "conv", side=side, features=features)


def _attention(name, tokens, context, head_dim, heads=8):
    return Layer(name, "attention", tokens=tokens, context=context, heads=heads, head_dim=head_dim)


# SD 1.5 at 512 px (64×64 latents): each level's convolution, its self-attention (8 heads everywhere),
# the 77-token cross-attention, a GroupNorm + SiLU and GEGLU's projection at the largest level.
LAYERS = {
    "sd15": [_conv("conv_64", 64, 320), _conv("conv_32", 32, 640), _conv("conv_16", 16, 1280),
             _conv("conv_8", 8, 1280),
             _attention("self_attention_64", 4096, 4096, 40), _attention("self_attention_32", 1024, 1024, 80),
             _attention("self_attention_16", 256, 256, 160), _attention("cross_attention_64", 4096, 77, 40),
             Layer("group_norm_silu_64", "group_norm_silu", side=64, features=320),
             Layer("geglu_64", "dense", tokens=4096, features=320, out_features=2560)],
    # The embedded tiny model's largest level (tests; 16×16 latents, 8 groups, 2 heads).
    "tiny": [_conv("conv_16", 16, 32), _attention("self_attention_16", 256, 256, 16, heads=2),
             _attention("self_attention_64", 4096, 4096, 8, heads=1),  # long enough to be chunked
             _attention("cross_attention_16", 256, 77, 16, heads=2),
             Layer("group_norm_silu_16", "group_norm_silu", side=16, features=32, groups=8),
             Layer("geglu_16", "dense", tokens=256, features=32, out_features=256)],
}


def _arrays(layer: Layer, batch: int, seed: int) -> dict[str, np.ndarray]:
    """The layer's inputs (channels last) and weights, random, float32."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    if layer.kind == "attention":
        return {"q": normal(batch, layer.tokens, layer.heads, layer.head_dim),
                **{name: normal(batch, layer.context, layer.heads, layer.head_dim) for name in ("k", "v")}}
    if layer.kind == "dense":
        return {"x": normal(batch, layer.tokens, layer.features),
                "kernel": normal(layer.features, layer.out_features, scale=layer.features**-0.5),
                "bias": normal(layer.out_features, scale=0.1)}
    x = normal(batch, layer.side, layer.side, layer.features)
    if layer.kind == "conv":
        return {"x": x, "kernel": normal(3, 3, layer.features, layer.features, scale=(9 * layer.features)**-0.5),
                "bias": normal(layer.features, scale=0.1)}
    return {"x": x, "scale": 1 + normal(layer.features, scale=0.1), "bias": normal(layer.features, scale=0.1)}


def _inputs(layer: Layer) -> tuple[str, ...]:
    return ("q", "k", "v") if layer.kind == "attention" else ("x",)


def _weights(layer: Layer, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: value for name, value in arrays.items() if name not in _inputs(layer)}


def _jax_function(layer: Layer) -> Callable:
    """The layer in mlmjax: ``f(weights, *inputs)`` (inputs channels last) → its output. The weights are
    arguments, as in a train step, so that XLA cannot fold them into the program."""
    import jax.numpy as jnp

    from mlmjax.models import lean_ops, layers
    from mlmjax.models.attention import dot_product_attention

    if layer.kind == "attention":
        return lambda weights, q, k, v: dot_product_attention(q, k, v)
    if layer.kind == "conv":
        module = layers.conv(layer.features, dtype=jnp.float32)
    elif layer.kind == "dense":
        module = layers.dense(layer.out_features, dtype=jnp.float32)
    else:
        norm = layers.group_norm(layer.groups, 1e-5, dtype=jnp.float32, name="norm")
        return lambda weights, x: lean_ops.silu(norm.apply({"params": weights}, x))
    return lambda weights, x: module.apply({"params": weights}, x)


def _torch_function(layer: Layer, arrays: dict[str, np.ndarray]) -> tuple[Callable, Callable[[np.ndarray], Any]]:
    """The layer as diffusers runs it in PyTorch, and how an input array (channels last) becomes its input."""
    import torch
    import torch.nn.functional as F

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    if layer.kind == "attention":  # [B, heads, L, D]
        return F.scaled_dot_product_attention, lambda a: tensor(a.transpose(0, 2, 1, 3))
    if layer.kind == "dense":
        kernel, bias = tensor(arrays["kernel"].T), tensor(arrays["bias"])
        return lambda x: F.linear(x, kernel, bias), tensor
    channels_first = lambda a: tensor(a.transpose(0, 3, 1, 2))  # noqa: E731
    if layer.kind == "conv":
        kernel, bias = tensor(arrays["kernel"].transpose(3, 2, 0, 1)), tensor(arrays["bias"])
        return lambda x: F.conv2d(x, kernel, bias, padding=1), channels_first
    scale, bias = tensor(arrays["scale"]), tensor(arrays["bias"])
    return lambda x: F.silu(F.group_norm(x, layer.groups, scale, bias, eps=1e-5)), channels_first


def _channels_last(layer: Layer, out: np.ndarray) -> np.ndarray:
    """A PyTorch output in the JAX layer's layout."""
    if layer.kind == "attention":
        return out.transpose(0, 2, 1, 3)
    return out.transpose(0, 2, 3, 1) if layer.kind in ("conv", "group_norm_silu") else out


def _timed(call: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    from mlmjax import bench_torch

    def step():
        call()
        return {"loss": 0.0}

    return bench_torch.time_steps(step, warmup=warmup, repeats=repeats)[1]


def _time_jax(function: Callable, weights: dict[str, np.ndarray], inputs: list[np.ndarray], warmup: int,
              repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from mlmjax import aot

    args = [{name: jnp.asarray(value) for name, value in weights.items()}, *(jnp.asarray(a) for a in inputs)]
    # The inputs' gradient of the output's squared sum, as PyTorch's side takes it; the weights frozen.
    gradient = jax.grad(lambda *xs: jnp.sum(function(*xs) ** 2), argnums=tuple(range(1, len(args))))
    options = aot.xla_kernel_options() or None
    forward, backward = (jax.jit(f).lower(*args).compile(options) for f in (function, gradient))
    out = np.asarray(forward(*args))
    return {"output": out,
            "forward_s": _timed(lambda: jax.block_until_ready(forward(*args)), warmup, repeats),
            "gradient_s": _timed(lambda: jax.block_until_ready(backward(*args)), warmup, repeats)}


def _time_torch(function: Callable, inputs: list[Any], warmup: int, repeats: int) -> dict[str, Any]:
    import torch

    leaves = [x.clone().requires_grad_(True) for x in inputs]

    def forward():
        with torch.no_grad():
            return function(*inputs)

    def gradient():
        torch.autograd.grad((function(*leaves) ** 2).sum(), leaves)

    return {"output": forward().numpy(), "forward_s": _timed(forward, warmup, repeats),
            "gradient_s": _timed(gradient, warmup, repeats)}


def measure(layer: Layer, *, batch: int, warmup: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """One layer's row: both frameworks' times (seconds per call, forward and forward + the inputs'
    gradient), their medians and ratios, FLOPs and the outputs' difference."""
    arrays = _arrays(layer, batch, seed)
    inputs = [arrays[name] for name in _inputs(layer)]
    jax_side = _time_jax(_jax_function(layer), _weights(layer, arrays), inputs, warmup, repeats)
    torch_function, to_torch = _torch_function(layer, arrays)
    torch_side = _time_torch(torch_function, [to_torch(a) for a in inputs], warmup, repeats)
    expected = _channels_last(layer, torch_side.pop("output"))
    difference = float(np.max(np.abs(jax_side.pop("output") - expected)) / np.max(np.abs(expected)))
    row = {"layer": layer.name, **dataclasses.asdict(layer), "batch": batch,
           "forward_flops": layer.forward_flops(batch), "output_rel_difference": difference}
    for framework, side in (("jax", jax_side), ("torch", torch_side)):
        for part, times in side.items():
            row[f"{framework}_{part}"] = times
            row[f"{framework}_{part.removesuffix('_s')}_median_s"] = statistics.median(times)
    for part in ("forward", "gradient"):
        row[f"{part}_ratio"] = row[f"jax_{part}_median_s"] / row[f"torch_{part}_median_s"]
    return row


def markdown(result: dict) -> str:
    """The rows as a README-ready table, under the machine's line."""
    machine = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores; {versions}; {machine['date']}.",
             f"Batch {result['batch']}, medians of {result['repeats']} calls after {result['warmup']} untimed; "
             "times in ms; JAX/PyTorch < 1: JAX is faster.", "",
             "| layer | shape | GFLOP fwd | JAX fwd | PyTorch fwd | JAX/PyTorch fwd | JAX fwd+grad | "
             "PyTorch fwd+grad | JAX/PyTorch fwd+grad | output rel. difference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if row["kind"] == "attention":
            shape = f"{row['tokens']}×{row['context']} tokens, {row['heads']}×{row['head_dim']}"
        elif row["kind"] == "dense":
            shape = f"{row['tokens']} tokens, {row['features']}→{row['out_features']}"
        else:
            shape = f"{row['side']}², {row['features']} features"
        flops = row["forward_flops"]
        ms = lambda key: f"{1e3 * row[key]:.1f}"  # noqa: E731
        lines.append(
            f"| {row['layer']} | {shape} | {'–' if flops is None else f'{flops / 1e9:.1f}'} | "
            f"{ms('jax_forward_median_s')} | {ms('torch_forward_median_s')} | {row['forward_ratio']:.2f} | "
            f"{ms('jax_gradient_median_s')} | {ms('torch_gradient_median_s')} | {row['gradient_ratio']:.2f} | "
            f"{row['output_rel_difference']:.1e} |")
    return "\n".join(lines)


def select(size: str, names: list[str] | None = None) -> list[Layer]:
    """The layers of ``size`` named (all of them without ``names``); ValueError names any unknown one."""
    known = {layer.name: layer for layer in LAYERS[size]}
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise ValueError(f"--layers: unknown layer(s) {', '.join(unknown)} at size {size}; "
                         f"choose from {', '.join(known)}")
    return [known[name] for name in names] if names else list(known.values())


def run(layers: list[Layer], *, batch: int, warmup: int, repeats: int,
        log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Each layer measured in turn (:func:`measure`), with the machine's description."""
    from mlmjax import bench_cases

    rows = []
    for layer in layers:
        rows.append(measure(layer, batch=batch, warmup=warmup, repeats=repeats))
        log(f"{layer.name}: JAX/PyTorch forward {rows[-1]['forward_ratio']:.2f}, "
            f"with the gradient {rows[-1]['gradient_ratio']:.2f}")
    return {"machine": bench_cases.describe_machine(), "batch": batch, "warmup": warmup, "repeats": repeats,
            "rows": rows}


def define_flags() -> None:
    flags.DEFINE_enum("size", "sd15", SIZES, "sd15: Stable Diffusion 1.5's layers at 512 px; tiny: the "
                      "embedded model's")
    flags.DEFINE_string("layers", None, "comma-separated layer names (default: all of --size's)")
    flags.DEFINE_integer("batch", 4, "images per call (4: Textual Inversion's batch)")
    flags.DEFINE_integer("warmup", 2, "untimed calls first (at least 1)")
    flags.DEFINE_integer("repeats", 3, "timed calls (the median is reported)")
    flags.DEFINE_string("json", None, "write the rows (and the machine) to this JSON file")


def main(argv: list[str]) -> None:
    from mlmjax import files, runtime

    if len(argv) > 1:
        runtime.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    options = flags.FLAGS
    if options.warmup < 1 or options.repeats < 1 or options.batch < 1:
        runtime.fail("--warmup, --repeats and --batch must each be at least 1")
    if importlib.util.find_spec("torch") is None:
        runtime.fail("PyTorch is not installed: pip install -e '.[bench]'")
    runtime.quiet_library_logs()
    try:
        layers = select(options.size, options.layers.split(",") if options.layers else None)
    except ValueError as error:
        runtime.fail(str(error))
    result = run(layers, batch=options.batch, warmup=options.warmup, repeats=options.repeats,
                 log=lambda message: print(message, file=sys.stderr, flush=True))
    if options.json:
        files.write_json_atomic(options.json, result)
    print(markdown(result))


if __name__ == "__main__":
    from mlmjax import runtime

    runtime.relaunch_with_huge_pages()  # the temporaries' pages as the SD 1.5 steps get them
    define_flags()
    app.run(main, flags_parser=runtime.parse_flags)
