"""The diffusers-Flax reference train step that ``python -m mlmjax.bench --framework diffusers_flax`` times.

What a JAX user would write without mlmjax: diffusers' ``FlaxUNet2DConditionModel`` and transformers'
``FlaxCLIPTextModel`` (the last Flax models those libraries shipped: diffusers 0.39, transformers 4.57),
trained as diffusers' own Flax DreamBooth and Textual Inversion examples train them (one ``jax.jit`` over
loss, gradient and optax's AdamW, the trained parameters and the optimizer state donated), plus the MLM
branch written plainly here (the authors' contextualizer in ``jax.numpy``, the vocabulary projection at
the masked tokens only). It runs the step of a case folder written by the JAX side of the benchmark, the
same one :mod:`mlmjax.bench_torch` runs: the same configuration, batch, trainable set and, at the tiny
size, the same weights and first random draws, so its first loss must match mlmjax's.

Those libraries' Flax models need transformers 4 and a diffusers of at most 0.39, which mlmjax's own
environment (transformers 5) cannot hold: the benchmark runs this module in another interpreter,
``--diffusers_flax_python``, for example the one ``launch/diffusers_flax_env.sh`` makes (a virtual
environment over this one's packages with those versions on top).

Where diffusers-Flax cannot express the step, its row says so instead of timing something else: XTI/P+
gives each cross-attention layer its own text encoding, and diffusers' Flax UNet passes one encoding to
every layer, with no attention processors to change that (likewise remat: it has no gradient
checkpointing). Two differences from PyTorch's models remain, one of them adapted:

* diffusers' Flax UNet hard-codes 32 groups in its GroupNorms; the tiny UNet has 8. Where the config's
  group count differs, this module gives diffusers' Flax modules GroupNorms with the config's count (a
  substitution in their module namespace; nothing else changes), so that the step is the same function.
* Its GEGLU takes flax's GELU, the tanh approximation, where PyTorch's and mlmjax's are exact: the first
  losses differ by up to 4e-4 relative at the tiny size. ``--exact_gelu`` swaps in the exact one (the
  same substitution) as a parity check: then they agree to float32 rounding.

Memory: at SD 1.5 shapes diffusers-Flax's attention needs 38.5 GB of XLA temporaries; its
``use_memory_efficient_attention`` (query chunks) is on there, and off at the tiny size. The step is
compiled as mlmjax's own step is (``mlmjax.aot.compile_step``): with the same XLA options and, on a CPU,
the same reuse of small steps' temporaries from the heap (``mlmjax.runtime.reuse_host_memory``); and
``mlmjax.bench`` starts it with huge pages for malloc's mappings, as mlmjax's own (``GLIBC_TUNABLES``,
``mlmjax.runtime.huge_page_environment``). The comparison is of the steps, not of compiler or malloc
settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import sys
import time
import types
from typing import Any

import numpy as np

from mlmjax import bench_torch

FRAMEWORK = "diffusers_flax"
# The versions this module was written against: the last with Flax models.
REQUIRED = "diffusers 0.39 with FlaxUNet2DConditionModel and transformers 4.x with FlaxCLIPTextModel"


def _libraries():
    """``(FlaxUNet2DConditionModel, FlaxCLIPTextModel, CLIPTextConfig)``, or a one-line exit."""
    try:
        from diffusers import FlaxUNet2DConditionModel
        from transformers import CLIPTextConfig, FlaxCLIPTextModel
    except ImportError as error:
        raise SystemExit(f"{sys.executable}: no diffusers-Flax here ({error}); the reference needs {REQUIRED}: "
                         "make that environment with launch/diffusers_flax_env.sh and pass its python as "
                         "--diffusers_flax_python") from None
    return FlaxUNet2DConditionModel, FlaxCLIPTextModel, CLIPTextConfig


def unsupported(case: dict) -> str | None:
    """Why diffusers-Flax cannot run ``case``'s step, or None."""
    if case.get("layer_tokens") is not None:
        return ("XTI/P+ gives each cross-attention layer its own text encoding; diffusers' Flax UNet passes one "
                "to every layer")
    if case.get("remat"):
        return "diffusers' Flax UNet has no gradient checkpointing (remat)"
    return None


# ---------------------------------------------------------------------------------------------------
# Models


def _change_diffusers_linen(groups: int, exact_gelu: bool) -> None:
    """Gives diffusers' Flax UNet modules GroupNorms of ``groups`` groups (they hard-code 32) and, with
    ``exact_gelu``, the exact GELU in their GEGLU (they use flax's default, the tanh approximation):
    a ``flax.linen`` namespace of their own with those two names changed."""
    import flax.linen as nn
    import jax
    from diffusers.models import attention_flax, resnet_flax
    from diffusers.models.unets import unet_2d_condition_flax

    linen = types.ModuleType("linen_for_diffusers")
    linen.__dict__.update(vars(nn))
    linen.GroupNorm = lambda num_groups=32, **kwargs: nn.GroupNorm(num_groups=groups, **kwargs)
    if exact_gelu:
        linen.gelu = functools.partial(jax.nn.gelu, approximate=False)
    for module in (attention_flax, resnet_flax, unet_2d_condition_flax):
        module.nn = linen


def _unet(config: dict, dtype, memory_efficient: bool, exact_gelu: bool = False):
    """diffusers' Flax UNet of a PyTorch ``UNet2DConditionModel`` config; the keys it has no field for
    must hold the values it hard-codes (but the GroupNorms' group count, see the module's docstring)."""
    unet_class, _, _ = _libraries()
    fields = {f.name for f in dataclasses.fields(unet_class)}
    groups = config.get("norm_num_groups", 32)
    fixed = {"norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
             "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2DCrossAttn",
             "upcast_attention": False, "resnet_time_scale_shift": "default"}
    for key, value in fixed.items():
        if key in config and config[key] != value:
            raise SystemExit(f"UNet config {key}={config[key]!r}: diffusers' Flax UNet supports only {value!r}")
    if groups != 32 or exact_gelu:
        _change_diffusers_linen(groups, exact_gelu)
    kwargs = {k: v for k, v in config.items() if k in fields}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return unet_class(**kwargs, dtype=dtype, use_memory_efficient_attention=memory_efficient)


def _torch_state_dict(path: str):
    import safetensors.torch

    return {k: v.float() for k, v in safetensors.torch.load_file(path).items()}


class _ShapesOnly:
    """A diffusers Flax model whose ``init_weights`` gives shapes only: diffusers' PyTorch converter draws
    a whole random model, eagerly (a compile per tensor shape), just to read its parameters' names and
    shapes. (transformers' Flax CLIP cannot skip its draw: with ``from_pt`` its converter reads
    ``model.params``, which ``_do_init=False`` forbids.)"""

    def __init__(self, model):
        self.model = model

    def init_weights(self, rng):
        import jax

        return jax.eval_shape(self.model.init_weights, rng)


def load_models(case: dict, dtype, memory_efficient: bool, extra_rows: int, exact_gelu: bool = False):
    """``(unet, text_encoder, params)`` of the case: diffusers' and transformers' Flax models, the text
    encoder's vocabulary widened by ``extra_rows`` (the concept tokens and [MASK], whose rows the step
    splices in), and their float32 parameters ``{"unet": ..., "text_encoder": ...}``: the case folder's
    weights converted by the libraries' own PyTorch converters, or their own random initialisation."""
    import jax
    import jax.numpy as jnp
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    _, text_class, text_config_class = _libraries()
    model = case["model"]
    if model["kind"] == "folder":
        with open(os.path.join(model["path"], "unet", "config.json")) as f:
            unet = _unet(json.load(f), dtype, memory_efficient, exact_gelu)
        unet_params = convert_pytorch_state_dict_to_flax(
            _torch_state_dict(os.path.join(model["path"], "unet", "diffusion_pytorch_model.safetensors")),
            _ShapesOnly(unet))
        loaded = text_class.from_pretrained(os.path.join(model["path"], "text_encoder"), from_pt=True)
        text_config, text_params = loaded.config, loaded.params
    else:
        unet = _unet(model["unet_config"], dtype, memory_efficient, exact_gelu)
        unet_params = jax.jit(unet.init_weights)(jax.random.key(case["seed"]))
        text_config = text_config_class(**model["text_encoder_config"])
        text_params = text_class(text_config, seed=case["seed"] + 1, dtype=dtype).params
    text_config.vocab_size += extra_rows
    text_encoder = text_class(text_config, dtype=dtype, _do_init=False)
    params = {"unet": unet_params, "text_encoder": text_params}
    return unet, text_encoder, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def _match_key(component: str, path: tuple[str, ...]) -> tuple[str, ...]:
    """A Flax parameter's key for matching a PyTorch name: its module path and whether it is a bias."""
    return (component, *path[:-1], "bias" if path[-1] == "bias" else "weight")


def _torch_match_key(component: str, name: str) -> tuple[str, ...]:
    """A PyTorch parameter name's key in :func:`_match_key`'s terms: diffusers' Flax modules name the
    n-th child ``down_blocks_0`` where PyTorch says ``down_blocks.0`` (as diffusers' own converter
    renames them); transformers' Flax CLIP keeps PyTorch's names under ``text_model`` (which mlmjax's
    names, as transformers 5's, leave out)."""
    *prefix, leaf = name.split(".")
    if component == "unet":
        prefix = re.sub(r"(\w+)\.(\d+)", r"\1_\2", ".".join(prefix)).split(".")
    elif prefix[0] != "text_model":
        prefix = ["text_model", *prefix]
    return (component, *prefix, "bias" if leaf == "bias" else "weight")


def split_trainable(params: dict, trainable: dict[str, list[str]]) -> tuple[dict, dict]:
    """``params`` flattened to ``{path: array}`` and split into the trained and the frozen ones, the
    trained being exactly the PyTorch names the case lists (each must name one Flax parameter)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    wanted = {_torch_match_key(component, name): name for component in ("unet", "text_encoder")
              for name in trainable[component]}
    chosen = {path for path in flat if _match_key(path[0], path[1:]) in wanted}
    found = {_match_key(path[0], path[1:]) for path in chosen}
    missing = sorted(name for key, name in wanted.items() if key not in found)
    if missing or len(chosen) != len(wanted):
        raise ValueError(f"trainable parameters without one Flax counterpart: {missing[:5]} "
                         f"({len(chosen)} Flax parameters for {len(wanted)} names)")
    return ({path: value for path, value in flat.items() if path in chosen},
            {path: value for path, value in flat.items() if path not in chosen})


# ---------------------------------------------------------------------------------------------------
# The MLM branch: the authors' contextualizer (ContextNetV3, their state-dict names) in jax.numpy


def _linear(weights: dict, name: str, x):
    return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]


def _layer_norm(weights: dict, name: str, x, eps: float = 1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / (var + eps) ** 0.5 * weights[f"{name}.weight"] + weights[f"{name}.bias"]


def _self_attention(weights: dict, name: str, x, heads: int):
    import jax
    import jax.numpy as jnp

    n, length, width = x.shape
    qkv = x @ weights[f"{name}.in_proj_weight"].T + weights[f"{name}.in_proj_bias"]
    q, k, v = (t.reshape(n, length, heads, width // heads) for t in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(n, length, width)
    return _linear(weights, f"{name}.out_proj", out)


def contextualizer_features(weights: dict, config: dict, x):
    """ContextNetV3's features of the text encoder's output ``x`` (``[M, L, D]``), before its vocabulary
    projection ``final``; ``tests/test_bench_diffusers_flax.py`` checks it against the torch module."""
    import jax

    x = x + weights["position_embedding.weight"][: x.shape[1]]
    blocks = config["num_blocks"]
    for i in range(1, blocks + 1):
        x = _layer_norm(weights, f"layer_norm{i}", x + _self_attention(weights, f"multi_head_attention{i}", x,
                                                                         config["num_heads"]))
        if i < blocks:
            y = _linear(weights, f"feed_forward{i}.W_ff2",
                        jax.nn.relu(_linear(weights, f"feed_forward{i}.W_ff1", x)))
            x = x + y if config.get("ffn_residual", False) else y
    return x


def load_contextualizer(folder: str) -> tuple[dict, dict, np.ndarray]:
    """``(config, weights, mask_embedding)`` of a contextualizer folder (the authors' names)."""
    import safetensors.numpy

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    weights = safetensors.numpy.load_file(os.path.join(folder, "contextualizer.safetensors"))
    mask = safetensors.numpy.load_file(os.path.join(folder, "mask_embedding.safetensors"))["mask_embedding"]
    return config, {k: np.asarray(v, np.float32) for k, v in weights.items()}, np.asarray(mask, np.float32)


# ---------------------------------------------------------------------------------------------------
# The step


@dataclasses.dataclass(frozen=True)
class _Models:
    """What the loss closes over: the two Flax models, the contextualizer's config (None without MLM),
    the case and the compute dtype."""

    unet: Any
    text_encoder: Any
    contextualizer_config: dict | None
    case: dict
    dtype: Any
    mesh: Any = None


def _rows_sharding(mesh, shape: tuple[int, ...]):
    """An array of ``shape`` split by rows over the mesh's ``data`` axis where their count divides it,
    else whole on every device: how a JAX user shards a batch for ``jax.jit``."""
    from jax.sharding import NamedSharding, PartitionSpec

    divides = len(shape) > 0 and shape[0] % mesh.size == 0
    return NamedSharding(mesh, PartitionSpec("data") if divides else PartitionSpec())


def _encode(models: _Models, tree: dict, ids):
    """The text encoder's last hidden states, its token table widened by the concept rows (and [MASK])."""
    import jax.numpy as jnp

    text_model = tree["text_encoder"]["text_model"]
    extra = [tree["concept"]] + ([tree["mask_embedding"]] if "mask_embedding" in tree else [])
    table = jnp.concatenate([text_model["embeddings"]["token_embedding"]["embedding"], *extra])
    embeddings = {**text_model["embeddings"], "token_embedding": {"embedding": table}}
    params = {**tree["text_encoder"], "text_model": {**text_model, "embeddings": embeddings}}
    return models.text_encoder(ids, params=params, train=False).last_hidden_state


def _loss(models: _Models, trained: dict, frozen: dict, batch: dict, draws: dict):
    """L_diff + w_prior · L_prior + λ · CE at the masked tokens, as ``mlmjax.train_step`` and the PyTorch
    reference compute it; ``(loss, parts)``."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    case = models.case
    tree = traverse_util.unflatten_dict({**trained, **frozen})
    mean, logvar, ids = batch["latent_mean"], batch["latent_logvar"], batch["input_ids"]
    if "prior_input_ids" in batch:
        mean = jnp.concatenate([mean, batch["prior_latent_mean"]])
        logvar = jnp.concatenate([logvar, batch["prior_latent_logvar"]])
        ids = jnp.concatenate([ids, batch["prior_input_ids"]])
    if models.mesh is not None:  # the instance and prior images together split over the devices
        mean, logvar, ids = (jax.lax.with_sharding_constraint(rows, _rows_sharding(models.mesh, rows.shape))
                             for rows in (mean, logvar, ids))
    latents = (mean + jnp.exp(0.5 * logvar) * draws["sample"]) * case["scaling_factor"]
    noise, timesteps = draws["noise"], draws["timesteps"]
    alpha_bar = jnp.asarray(case["alphas_cumprod"], jnp.float32)[timesteps].reshape(-1, 1, 1, 1)
    noisy = jnp.sqrt(alpha_bar) * latents + jnp.sqrt(1 - alpha_bar) * noise
    target = noise if case["prediction_type"] == "epsilon" else (
        jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1 - alpha_bar) * latents)
    # diffusers' Flax UNet takes and gives channels first, as its PyTorch twin.
    prediction = models.unet.apply({"params": tree["unet"]}, noisy.transpose(0, 3, 1, 2), timesteps,
                                   _encode(models, tree, ids)).sample
    per_example = ((prediction.astype(jnp.float32).transpose(0, 2, 3, 1) - target) ** 2).mean(axis=(1, 2, 3))
    instance = batch["input_ids"].shape[0]
    parts = {"loss_diff": per_example[:instance].mean()}
    loss = parts["loss_diff"]
    if per_example.shape[0] > instance:
        parts["loss_prior"] = per_example[instance:].mean()
        loss = loss + case["prior_weight"] * parts["loss_prior"]
    if models.contextualizer_config is not None:
        parts["loss_mlm"] = _mlm_loss(models, tree, batch)
        loss = loss + case["mlm_weight"] * parts["loss_mlm"]
    parts["loss"] = loss
    return loss, parts


def _mlm_loss(models: _Models, tree: dict, batch: dict):
    """The contextualizer's cross-entropy at the masked tokens of the context prompts."""
    import jax.numpy as jnp
    import optax

    weights = {k: v.astype(models.dtype) for k, v in tree["contextualizer"].items()}
    features = contextualizer_features(weights, models.contextualizer_config,
                                       _encode(models, tree, batch["mlm_input_ids"]))
    rows, columns = batch["mlm_rows"], batch["mlm_columns"]
    logits = _linear(weights, "final", features[rows, columns]).astype(jnp.float32)  # masked tokens only
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["mlm_labels"][rows, columns]).mean()


def _optimizer(case: dict):
    """optax's AdamW with the case's settings (and global-norm clipping where it asks)."""
    import optax

    o = case["optimizer"]
    return optax.chain(
        optax.clip_by_global_norm(o["grad_clip"]) if o["grad_clip"] else optax.identity(),
        optax.adamw(case["learning_rate"], b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=o["weight_decay"]))


def _train_step(models: _Models, optimizer, trained, opt_state, frozen, batch, draws):
    """One optimisation step: the loss's gradient in the trained parameters, AdamW; the new trained
    parameters and optimizer state, and the loss's parts."""
    import jax
    import optax

    (_, parts), grads = jax.value_and_grad(functools.partial(_loss, models), has_aux=True)(
        trained, frozen, batch, draws)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, parts


def _draw(rows: int, latent_shape: tuple[int, ...], num_timesteps: int, key):
    """A step's random draws (what the PyTorch reference draws per step), drawn with jax."""
    import jax

    sample_key, noise_key, time_key = jax.random.split(key, 3)
    return {"sample": jax.random.normal(sample_key, (rows, *latent_shape)),
            "noise": jax.random.normal(noise_key, (rows, *latent_shape)),
            "timesteps": jax.random.randint(time_key, (rows,), 0, num_timesteps)}


class FlaxStep:
    """The reference step of one case, compiled when built; :meth:`step` runs one optimisation step and
    returns the losses."""

    def __init__(self, case: dict, arrays: dict[str, np.ndarray], memory_efficient: bool, exact_gelu: bool = False,
                 devices: int = 1):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec

        from mlmjax import aot

        dtype = jnp.bfloat16 if case["compute_dtype"] == "bfloat16" else jnp.float32
        extra = {"concept": np.asarray(arrays["concept_init"], np.float32)}
        ctx_config = None
        if case["mlm_weight"]:
            ctx_config, ctx_weights, mask_embedding = load_contextualizer(case["contextualizer"])
            extra["mask_embedding"] = mask_embedding[None]
        unet, text_encoder, params = load_models(case, dtype, memory_efficient,
                                                 sum(len(rows) for rows in extra.values()), exact_gelu)
        trained, frozen = split_trainable(params, case["trainable"])
        (trained if case["trainable"]["concept"] else frozen)[("concept",)] = jnp.asarray(extra["concept"])
        if ctx_config is not None:
            frozen[("mask_embedding",)] = jnp.asarray(extra["mask_embedding"])
            frozen.update({("contextualizer", k): jnp.asarray(v) for k, v in ctx_weights.items()})
        self.trainable_params = sum(int(np.prod(v.shape)) for v in trained.values())
        batch = {k.removeprefix("batch/"): np.asarray(v) for k, v in arrays.items() if k.startswith("batch/")}
        if ctx_config is not None:  # the masked positions: a fixed batch, so their count is known (no padding)
            batch["mlm_rows"], batch["mlm_columns"] = np.nonzero(batch["mlm_mask"])
        # Data parallel over `devices` (the CPU split into as many, as mlmjax's step is with
        # --cpu_devices): the weights and optimizer state whole on every device, the batch and the draws
        # split by rows where they divide.
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), ("data",)) if devices > 1 else None
        everywhere = NamedSharding(mesh, PartitionSpec()) if mesh else jax.devices()[0]

        def by_rows(rows):
            return jax.device_put(rows, _rows_sharding(mesh, rows.shape) if mesh else everywhere)

        self.batch = {k: by_rows(v) for k, v in batch.items()}
        self.models = models = _Models(unet, text_encoder, ctx_config, case, dtype, mesh)
        optimizer = _optimizer(case)
        trained, frozen = jax.device_put((trained, frozen), everywhere)
        self.trained, self.frozen, self.opt_state = trained, frozen, optimizer.init(trained)
        self.first_draws = {k.removeprefix("draws/"): by_rows(v) for k, v in arrays.items()
                            if k.startswith("draws/")}
        step = functools.partial(_train_step, models, optimizer)
        self.compiled = aot.compile_step(jax.jit(step, donate_argnums=(0, 1)), self.trained, self.opt_state,
                                         self.frozen, self.batch, self.first_draws)
        rows = len(self.first_draws["timesteps"])
        draw = functools.partial(_draw, rows, batch["latent_mean"].shape[1:], len(case["alphas_cumprod"]))
        self.key = jax.random.key(case["seed"])
        out_shardings = {k: v.sharding for k, v in self.first_draws.items()}
        # compiled here, not in a timed step
        self.draw = jax.jit(draw, out_shardings=out_shardings).lower(self.key).compile()
        self.calls = 0

    def time_mlm_branch(self, warmup: int, repeats: int) -> list[float]:
        """Seconds of the MLM branch alone (its loss and gradient with respect to the trained parameters
        it reaches, all but the UNet's), compiled on its own, as ``bench_cases`` times mlmjax's."""
        from flax import traverse_util

        text_side = {k: v for k, v in self.trained.items() if k[0] != "unet"}
        rest = {**{k: v for k, v in self.trained.items() if k[0] == "unet"}, **self.frozen}

        def branch(text_side, rest, batch):
            return _mlm_loss(self.models, traverse_util.unflatten_dict({**text_side, **rest}), batch)

        return bench_torch.time_gradient(branch, (text_side, rest, self.batch), warmup=warmup, repeats=repeats)

    def step(self) -> dict[str, float]:
        import jax

        if self.calls == 0:
            draws = self.first_draws  # the JAX step's first draws: a comparable first loss
        else:
            draws = self.draw(jax.random.fold_in(self.key, self.calls))
        self.trained, self.opt_state, parts = self.compiled(self.trained, self.opt_state, self.frozen, self.batch,
                                                            draws)
        self.calls += 1
        return {name: float(value) for name, value in parts.items()}  # waits for the step


def run_case(case_dir: str, *, warmup: int, repeats: int, attention: str = "auto",
             exact_gelu: bool = False, mlm_branch: bool = False, devices: int = 1) -> dict[str, Any]:
    """Builds the reference step of a case folder, compiles and times it: one row of the benchmark.
    ``exact_gelu`` checks the rest of the step: see ``--exact_gelu``; ``mlm_branch`` also times the MLM
    branch alone (``mlm_branch_times_s``); ``devices`` > 1 runs it data-parallel over that many devices."""
    import diffusers
    import jax
    import transformers

    case, arrays = bench_torch.load_case(case_dir)
    row: dict[str, Any] = {"framework": FRAMEWORK,
                           "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                                        "jax": jax.__version__}}
    reason = unsupported(case)
    if reason:  # reported as such, not as a failure
        return {**row, "unsupported": reason}
    memory_efficient = case["size"] != "tiny" if attention == "auto" else attention == "memory_efficient"
    start = time.perf_counter()
    step = FlaxStep(case, arrays, memory_efficient, exact_gelu, devices)
    compiled = step.compiled
    row.update(build_s=time.perf_counter() - start, compile_s=compiled.compile_seconds,
               flops_compiled=compiled.flops, flops_lowered=compiled.lowered_flops, memory=compiled.memory,
               compiler_options=compiled.compiler_options,
               peak_memory_bytes=None if compiled.memory is None else compiled.memory["peak_bytes"],
               attention="memory_efficient" if memory_efficient else "plain", exact_gelu=exact_gelu,
               trainable_params=step.trainable_params, device_kind=jax.devices()[0].device_kind, cpu_devices=devices)
    rss_before = bench_torch.peak_rss_bytes()
    # The JAX step's first draws, then its own; FlaxStep.step waits for its losses.
    first, times = bench_torch.time_steps(step.step, warmup=warmup, repeats=repeats)
    print(f"[bench diffusers-flax] {len(times)} timed steps, median {statistics.median(times) * 1000:.1f} ms",
          file=sys.stderr, flush=True)
    row.update(times_s=times, first_loss=first, rss_before_step_bytes=rss_before,
               peak_rss_bytes=bench_torch.peak_rss_bytes())
    if mlm_branch and case["mlm_weight"]:
        row["mlm_branch_times_s"] = step.time_mlm_branch(warmup, repeats)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one diffusers-Flax row of python -m mlmjax.bench (a subprocess)")
    parser.add_argument("--case", required=True, help="a case folder written by the JAX side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention", default="auto", choices=("auto", "plain", "memory_efficient"),
                        help="diffusers-Flax's attention; auto: memory-efficient except at the tiny size")
    parser.add_argument("--exact_gelu", action="store_true",
                        help="a parity check, not a benchmark: diffusers' GEGLU with the exact GELU that PyTorch "
                        "and mlmjax use instead of its tanh approximation, so the first loss must match the "
                        "JAX step's to float32 rounding")
    parser.add_argument("--mlm_branch", action="store_true",
                        help="also time the MLM branch alone (its loss and gradient), compiled on its own")
    parser.add_argument("--cpu_devices", type=int, default=0,
                        help="data-parallel over this many devices (XLA_FLAGS must give JAX's CPU as many); 0: one")
    parser.add_argument("--out", required=True, help="where the row's JSON is written")
    args = parser.parse_args(argv)
    # Their Flax classes warn of their deprecation on every construction, and of float16 checkpoints
    # (cast to float32 here): one configuration's log would be hundreds of such lines.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    _libraries()
    import transformers

    transformers.utils.logging.set_verbosity_error()  # imported (by mlmjax) before the variable could count
    import jax

    devices = max(1, args.cpu_devices)
    if devices > jax.local_device_count():
        raise SystemExit(f"error: --cpu_devices={args.cpu_devices}, but JAX has {jax.local_device_count()} "
                         f"device(s): start it with XLA_FLAGS=--xla_force_host_platform_device_count={devices} "
                         "(python -m mlmjax.bench does)")
    row = run_case(args.case, warmup=max(1, args.warmup), repeats=args.repeats, attention=args.attention,
                   exact_gelu=args.exact_gelu, mlm_branch=args.mlm_branch, devices=devices)
    with open(args.out, "w") as f:
        json.dump(row, f)


if __name__ == "__main__":
    sys.exit(main())
