"""What one benchmark case times, built inside a worker subprocess of ``python -m mlmjax.bench``.

The models (the embedded tiny one, or SD 1.5 shapes with random or abstract weights), the method
configs, the batch and the case folder the PyTorch reference reads (``prepare_case``); the JAX side of
a case, compiled and timed (``run_jax_case``), or compiled only from abstract arrays
(``sharded_memory``), with XLA's FLOP counts; and the machine it runs on, with its matmul peak.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from typing import Any

import numpy as np

from mlmjax import bench_report
from mlmjax import bench_torch
from mlmjax import config as config_lib

# Stable Diffusion 1.5 shapes (diffusers / transformers configs). Random weights: nothing is downloaded.
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}
SD15_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "scaling_factor": 0.18215}


# ---------------------------------------------------------------------------------------------------
# The machine


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, load, library versions and XLA_FLAGS, for the JSON and the table header."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": model, "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
            "python": platform.python_version(), "versions": versions,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_platforms": os.environ.get("JAX_PLATFORMS", ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def jax_matmul_peak(size: int | None = None, repeats: int = 10, dtype: str = "float32") -> dict[str, Any]:
    """Achieved FLOP/s of a jitted ``size × size`` matrix multiply in ``dtype`` on the default device
    (random operands: zeros multiply faster on some accelerators): median of ``repeats``."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    size = size or bench_torch.matmul_size(device.platform)
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
    matmul = jax.jit(jnp.matmul)
    for _ in range(2):
        matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"size": size, "dtype": dtype, "median_s": median, "flops_per_s": 2 * size**3 / median,
            "platform": device.platform, "device_kind": device.device_kind}


# ---------------------------------------------------------------------------------------------------
# Models, configs and batches (JAX side; runs inside the worker subprocess)


class _RandomMoments:
    """Stands in for the VAE at SD 1.5 shapes: latent moments are precomputed before the step, so the
    step's cost does not depend on them. ``apply(..., method=encode)`` gives random moments of the
    shape the SD VAE gives (``[N, R/8, R/8, 4]``)."""

    def __init__(self):
        self.config = types.SimpleNamespace(**SD15_VAE)

    def encode(self):  # only a marker for ``apply(..., method=vae.encode)``
        raise NotImplementedError

    def apply(self, variables, images, method=None):
        import jax
        import jax.numpy as jnp

        del variables, method
        factor = 2 ** (len(SD15_VAE["block_out_channels"]) - 1)
        n, height, width, _ = images.shape
        shape = (n, height // factor, width // factor, SD15_VAE["latent_channels"])
        mean = jax.random.normal(jax.random.key(n), shape) + images[:, ::factor, ::factor, :1]
        return mean, jnp.full(shape, -6.0)


def _torch_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def _sd15_model(make_params):
    """A Pretrained of SD 1.5 shapes (text encoder and UNet; the VAE is replaced by random posterior
    moments); ``make_params(name, module, index)`` gives each network's parameters."""
    from mlmjax import pretrained as pretrained_lib
    from mlmjax import tiny
    from mlmjax import tokenizer as tokenizer_lib

    modules = {"text_encoder": pretrained_lib.build_component("text_encoder", SD15_TEXT_ENCODER_CONFIG),
               "unet": pretrained_lib.build_component("unet", SD15_UNET_CONFIG)}
    params = {name: make_params(name, module, i) for i, (name, module) in enumerate(modules.items())}
    params["vae"] = {}
    return pretrained_lib.Pretrained(tokenizer=tokenizer_lib.vendored_tokenizer(), vae=_RandomMoments(),
                                     scheduler_config=dict(tiny.SCHEDULER_CONFIG), params=params, **modules)


def build_model(size: str, seed: int = 0):
    """``(Pretrained, how PyTorch builds the same networks)`` for the tiny size or SD 1.5 shapes."""
    from mlmjax import pretrained as pretrained_lib
    from mlmjax import tiny

    if size == "tiny":
        folder = tiny.embedded_assets().model
        return pretrained_lib.load_pretrained(folder), {"kind": "folder", "path": folder}
    model = _sd15_model(lambda name, module, i: pretrained_lib.init_component(name, module, seed + i))
    return model, {"kind": "random", "unet_config": _torch_config(SD15_UNET_CONFIG),
                   "text_encoder_config": _torch_config(SD15_TEXT_ENCODER_CONFIG)}


def abstract_sd15_model():
    """SD 1.5 shapes with ``jax.ShapeDtypeStruct`` parameters: nothing allocated."""
    from mlmjax import pretrained as pretrained_lib

    return _sd15_model(lambda name, module, i: pretrained_lib.abstract_params(name, module))


def random_contextualizer(folder: str, seed: int = 0) -> str:
    """The authors' SD 1.5 contextualizer architecture with random weights, written to ``folder``."""
    import jax

    from mlmjax.models import contextualizer as ctx

    config = ctx.ContextualizerConfig()
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name in ("kernel", "in_proj_weight"):
            fan_in = leaf.shape[0] if name == "kernel" else leaf.shape[1]
            return rng.standard_normal(leaf.shape, np.float32) / np.float32(math.sqrt(fan_in))
        if name == "embedding":
            return rng.standard_normal(leaf.shape, np.float32) * np.float32(0.02)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    params = jax.tree_util.tree_map_with_path(draw, ctx.abstract_params(ctx.Contextualizer(config)))
    ctx.save_contextualizer(folder, config, params, rng.standard_normal(config.hidden_size).astype(np.float32))
    return folder


def method_config(method: str, mlm: bool, compute_dtype: str, configs_dir: str = config_lib.CONFIGS_DIR,
                  remat: bool = False):
    """``configs/<method>.py`` as the benchmark runs it: the tiny class noun, the paper's prompt set,
    ``compute_dtype``, MLM on or off (``mlm.weight`` 0) and ``remat``."""
    from mlmjax import tiny

    config = config_lib.load_method_config(method, configs_dir=configs_dir)
    config.concept.class_noun = tiny.CLASS_NOUN
    # The paper's prompt set at every size (the embedded default's would be the world's, whose shorter
    # prompts mask fewer tokens), so timings compare across sizes and with earlier runs.
    config.concept.family = "nonliving"
    config.compute_dtype = compute_dtype
    if remat:
        config.remat = True
    if not mlm:
        config.mlm.weight = 0.0
    return config


def _images(size: str, count: int, resolution: int, folder: str | None, seed: int) -> np.ndarray:
    from mlmjax import data as data_lib

    if size == "tiny":
        return data_lib.load_images(folder, resolution)[:count]
    return np.random.default_rng(seed).uniform(-1, 1, (count, resolution, resolution, 3)).astype(np.float32)


def first_draws(batch: dict, rng, num_train_timesteps: int) -> dict[str, np.ndarray]:
    """The random draws of the JAX step's first call (step 0), so that the PyTorch step makes the same
    first step (``train_step.diffusion_draws``, the function the step itself draws with)."""
    import jax

    from mlmjax import train_step as train_step_lib

    rows = batch["latent_mean"].shape[0] + (batch["prior_latent_mean"].shape[0] if "prior_latent_mean" in batch else 0)
    draws = train_step_lib.diffusion_draws(jax.random.fold_in(rng, 0), (rows, *batch["latent_mean"].shape[1:]),
                                           num_train_timesteps)
    return {name: np.asarray(value) for name, value in draws.items()}


def torch_trainable(state) -> dict[str, Any]:
    """The PyTorch names of the parameters the config marks trainable."""
    from mlmjax import weights

    names = {}
    for component in ("unet", "text_encoder"):
        names[component] = sorted(entry.torch_key for entry in weights.key_map(state.params.get(component, {})).values())
    names["concept"] = "concept" in state.params
    return names


def prepare_case(request: dict, case_dir: str):
    """Builds the state and the batch of one configuration and writes the case folder PyTorch reads.

    Returns ``(state, batch, rng, built)``.
    """
    import jax

    from mlmjax import method as method_lib
    from mlmjax import tiny

    size, method = request["size"], request["method"]
    config = method_config(method, request["mlm"], request["compute_dtype"], request["configs"],
                           request.get("remat", False))
    model, model_spec = build_model(size)
    contextualizer = None
    if request["mlm"]:
        contextualizer = (tiny.embedded_assets().contextualizer if size == "tiny"
                          else random_contextualizer(os.path.join(case_dir, "contextualizer")))
    built = method_lib.build_state(config, model, contextualizer_folder=contextualizer)
    embedded = tiny.embedded_assets() if size == "tiny" else None
    resolution = model.resolution
    concept_images = _images(size, 5, resolution, embedded and embedded.concept_images, 1)
    class_images = (_images(size, 12, resolution, embedded and embedded.class_images, 2)
                    if config.prior.weight else None)
    make_batch = method_lib.batch_function(config, model, built, concept_images=concept_images,
                                           class_images=class_images)
    batch = make_batch(0)
    rng = jax.random.key(config.seed)
    state = built.state
    spec = state.spec
    case = {
        "method": method, "mlm": request["mlm"], "size": size, "seed": config.seed, "model": model_spec,
        "compute_dtype": config.compute_dtype, "contextualizer": contextualizer,
        "remat": bool(config.get("remat", False)),
        "alphas_cumprod": list(spec.alphas_cumprod), "prediction_type": spec.prediction_type,
        "scaling_factor": spec.scaling_factor, "prior_weight": float(state.hyperparams.prior_weight),
        "mlm_weight": float(state.hyperparams.mlm_weight),
        "layer_tokens": None if spec.layer_tokens is None else list(spec.layer_tokens),
        "learning_rate": float(config.learning_rate), "optimizer": config.optimizer.to_dict(),
        "trainable": torch_trainable(state),
    }
    arrays = {f"batch/{k}": np.asarray(v) for k, v in batch.items()}
    arrays.update({f"draws/{k}": v for k, v in first_draws(batch, rng, len(spec.alphas_cumprod)).items()})
    arrays["concept_init"] = np.asarray(state.params["concept"]["embeddings"] if "concept" in state.params
                                        else state.frozen["concept"]["embeddings"], np.float32)
    with open(os.path.join(case_dir, bench_torch.CASE_JSON), "w") as f:
        json.dump(case, f)
    np.savez(os.path.join(case_dir, bench_torch.ARRAYS_NPZ), **arrays)
    return state, batch, rng, built


# ---------------------------------------------------------------------------------------------------
# The JAX side of a case: XLA's FLOPs, the step compiled and timed, or compiled only


def model_flops(state, batch, rng) -> float | None:
    """The step's model FLOPs: XLA's cost analysis of the step lowered (not compiled) with every
    attention's scores whole and the plain vocabulary projection. The step as it runs loops over
    query chunks and vocabulary chunks, and XLA's cost analysis counts a loop's body once: at SD 1.5
    shapes the compiled count misses 15 of the 16 chunks of each 4096-token attention."""
    import jax

    from mlmjax import aot
    from mlmjax import train_step as train_step_lib
    from mlmjax.models import attention

    def step(*args):  # a new function: jax's trace caches cannot hand back the step traced with chunks
        return train_step_lib.train_step(*args)

    state = state.replace(spec=dataclasses.replace(state.spec, vocab_chunk=None))
    with attention.implementation("whole"):
        return aot.flops(jax.jit(step).lower(state, batch, rng))


def mlm_flop_variants(state, batch, rng) -> dict[str, Any]:
    """XLA's FLOPs of the step lowered with the vocabulary projection at the masked positions
    (``max_masked`` rows, as the step runs) and at every position of the MLM batch, and the
    projection's analytic cost 4·N·D·V for each."""
    spec = state.spec
    rows, length = batch["mlm_input_ids"].shape
    every = rows * length
    masked = model_flops(state, batch, rng)
    everywhere = model_flops(state.replace(spec=dataclasses.replace(spec, max_masked=every)), batch, rng)
    width, vocab = spec.contextualizer.config.hidden_size, spec.contextualizer.config.vocab_size
    return {"mlm_positions_masked": spec.max_masked, "mlm_positions_all": every,
            "flops_lowered_masked": masked, "flops_lowered_all_positions": everywhere,
            "projection_flops_masked": 4 * spec.max_masked * width * vocab,
            "projection_flops_all_positions": 4 * every * width * vocab}


def _batch_rows(batch: dict) -> dict[str, int]:
    return {"batch": int(batch["input_ids"].shape[0]),
            "prior_batch": int(batch["prior_input_ids"].shape[0]) if "prior_input_ids" in batch else 0,
            "mlm_batch": int(batch["mlm_input_ids"].shape[0]) if "mlm_input_ids" in batch else 0}


def _log(message: str) -> None:
    """A progress line of a worker (its stderr reaches the console when it runs alone)."""
    print(f"[bench worker] {message}", file=sys.stderr, flush=True)


def _device_peak_bytes() -> int | None:
    """The allocator's peak on the first device (accelerators report it; a CPU gives None)."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics raise various errors
        return None
    return (stats or {}).get("peak_bytes_in_use")


def run_jax_case(request: dict, case_dir: str, partial: str | None = None) -> dict[str, Any]:
    """One JAX row: prepare the case (and the folder PyTorch reads), compile, time; the row so far is
    written to ``partial`` once compiled. ``request["attention"]`` picks the attention implementation
    the step is compiled with (``mlmjax.models.attention.IMPLEMENTATIONS``; default ``"auto"``)."""
    import jax

    from mlmjax import aot
    from mlmjax import sharding
    from mlmjax import train_step as train_step_lib
    from mlmjax import trainable
    from mlmjax.models import attention

    start = time.perf_counter()
    state, batch, rng, built = prepare_case(request, case_dir)
    row: dict[str, Any] = {"framework": "jax", "build_s": time.perf_counter() - start, **_batch_rows(batch)}
    if request.get("prepare_only"):
        return row
    _log(f"built in {row['build_s']:.1f} s")
    row["trainable_params"] = trainable.count(state.params)
    row["attention"] = request.get("attention", "auto")
    row["device_kind"] = jax.devices()[0].device_kind
    # Jitted as the trainer jits it, on one device or data-parallel over the CPU's devices
    # (config.mesh.cpu_devices); the batch is put on the devices once.
    devices = max(1, request.get("cpu_devices", 0))
    row["cpu_devices"] = devices
    mesh = sharding.make_mesh({"data": devices, "fsdp": 1, "tensor": 1}, jax.devices()[:devices])
    state = sharding.shard_state(state, mesh)
    device_batch = sharding.shard_batch(batch, mesh)
    jitted = sharding.jit_step(train_step_lib.train_step, state, mesh)
    with attention.implementation(row["attention"]):
        compiled = aot.compile_step(jitted, state, device_batch, rng)
    _log(compiled.describe())
    row.update(compile_s=compiled.compile_seconds, flops_compiled=compiled.flops,
               flops_lowered=compiled.lowered_flops, memory=compiled.memory,
               compiler_options=compiled.compiler_options,
               peak_memory_bytes=None if compiled.memory is None else compiled.memory["peak_bytes"])
    _save_partial(partial, row)  # what the compiler says survives a step that runs out of memory
    rss_before = bench_torch.peak_rss_bytes()
    state, metrics = compiled(state, device_batch, rng)
    first = {k: float(v) for k, v in metrics.items() if k.startswith("loss")}
    times = []
    warmup, repeats = max(1, request["warmup"]), request["repeats"]
    for i in range(warmup - 1 + repeats):
        begin = time.perf_counter()
        state, metrics = compiled(state, device_batch, rng)
        # As the training loop and diffusers-Flax's timing wait: on the metrics. An executable's outputs
        # are all ready when it has run, so the state is too; blocking on its arrays as well only adds
        # Python (3 ms a step for the 1200 arrays of tiny DreamBooth + MLM, 7% of its step).
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - begin
        if i >= warmup - 1:
            times.append(elapsed)
        if not math.isfinite(float(metrics["loss"])):
            raise FloatingPointError(f"non-finite loss {float(metrics['loss'])} at step {i + 1}")
    _log(f"{len(times)} timed steps, median {statistics.median(times) * 1000:.1f} ms")
    row.update(times_s=times, first_loss=first, rss_before_step_bytes=rss_before,
               peak_rss_bytes=bench_torch.peak_rss_bytes(), max_masked=built.max_masked,
               device_peak_bytes=_device_peak_bytes())
    if request.get("mlm_branch") and request["mlm"]:
        row["mlm_branch_times_s"] = _time_mlm_branch(state, device_batch, warmup, repeats)
        _log(f"MLM branch alone: median {statistics.median(row['mlm_branch_times_s']) * 1000:.1f} ms")
    if request.get("profile"):
        state = _profile(row, os.path.join(request["profile"], os.path.basename(case_dir)), compiled, state,
                         device_batch, rng)
    _save_partial(partial, row)  # the timed steps survive a FLOP count cut short
    if not request.get("count_flops", True):
        return {**row, "flops": None}
    if jax.default_backend() != "cpu":  # no cost analysis of a lowered step: the driver counts on the CPU
        return row
    # Counted last (lowering an SD 1.5 step again takes a while): the state is the last step's, of the
    # same shapes.
    row.update(_flop_fields(state, device_batch, rng, request["mlm"]), flops_counted_on="cpu")
    _log(f"model FLOPs {bench_report.fmt(row['flops'], '.4g', 1e9)} G per step")
    return row


def _time_mlm_branch(state, batch, warmup: int, repeats: int) -> list[float]:
    """Seconds of the MLM branch alone: the MLM loss and its gradient with respect to the trained
    parameters it reaches (all but the UNet's), compiled on its own. Beside the step's MLM-off twin it
    tells whether a step hides the branch in its idle cores or pays it in full."""
    from mlmjax import train_step as train_step_lib
    from mlmjax import trainable

    text_side = {k: v for k, v in state.params.items() if k != "unet"}
    unet = {k: v for k, v in state.params.items() if k == "unet"}

    def branch(text_side, unet, frozen, batch):
        params = trainable.merge({**text_side, **unet}, frozen)
        return train_step_lib.mlm_loss(state.spec, params, batch)[0]

    return bench_torch.time_gradient(branch, (text_side, unet, state.frozen, batch), warmup=warmup,
                                     repeats=repeats)


def _profile(row: dict, folder: str, compiled, state, batch, rng):
    """``row["profile"]``: a few more steps under the profiler (after the timed ones, so the timing is
    the profiler's), summed by operation kind and scope; the trace goes to ``folder``."""
    import jax

    from mlmjax import profiling

    carried = {"state": state}

    def one_step():  # the step donates its state: carry the new one into the next call
        carried["state"], metrics = compiled(carried["state"], batch, rng)
        jax.block_until_ready((carried["state"], metrics))

    row["profile"] = profiling.profile_calls(one_step, compiled.executable.as_text(), folder)
    _log(f"profiled: {row['profile']['op_ms_per_step']:.1f} ms of operations per step on the "
         f"{row['profile']['where']}; trace {row['profile']['trace']}")
    return carried["state"]


def _save_partial(path: str | None, row: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(row, f)


def _abstract_sd15_case(request: dict, mesh, case_dir: str):
    """The SD 1.5 step of ``request`` on ``mesh`` from abstract arrays, no weight allocated:
    ``(state, batch, rng)`` as ``jax.ShapeDtypeStruct``\\ s with their shardings, and the jitted step."""
    import jax

    from mlmjax import method as method_lib
    from mlmjax import sharding
    from mlmjax import train_step as train_step_lib

    devices = mesh.devices.size
    config = method_config(request["method"], request["mlm"], request["compute_dtype"], request["configs"],
                           request.get("remat", False))
    if request.get("per_device_batch"):
        config.batch_size = request["per_device_batch"] * devices
    model = abstract_sd15_model()
    contextualizer = random_contextualizer(os.path.join(case_dir, "contextualizer")) if request["mlm"] else None
    # build_state reads the init word's row of the token table on the host, so that one table is real
    # (0.15 GB of zeros); every other weight stays a ShapeDtypeStruct, traced by eval_shape.
    text_encoder = dict(model.params["text_encoder"])
    embeddings = dict(text_encoder.pop("embeddings"))
    table_shape = embeddings.pop("token_embedding")["embedding"].shape
    table = np.zeros(table_shape, np.float32)
    rest = {**model.params, "text_encoder": {**text_encoder, "embeddings": embeddings}}
    captured = {}

    def make_state(params):
        params = {**params, "text_encoder": {
            **params["text_encoder"], "embeddings": {**params["text_encoder"]["embeddings"],
                                                     "token_embedding": {"embedding": table}}}}
        built = method_lib.build_state(config, dataclasses.replace(model, params=params),
                                       contextualizer_folder=contextualizer, mesh=mesh)
        captured["built"] = built
        return built.state

    abstract_state = jax.eval_shape(make_state, rest)
    built = captured["built"]
    resolution = model.resolution
    images = np.zeros((2, resolution, resolution, 3), np.float32)
    make_batch = method_lib.batch_function(config, model, built, concept_images=images,
                                           class_images=images if config.prior.weight else None)
    batch = make_batch(0)

    def with_sharding(leaf, leaf_sharding):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf_sharding)

    state = jax.tree.map(with_sharding, abstract_state, sharding.state_shardings(abstract_state, mesh))
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(v.shape[0], mesh))
                      for k, v in batch.items()}
    key = jax.random.key(0)
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    jitted = sharding.jit_step(train_step_lib.train_step, abstract_state, mesh)
    return state, abstract_batch, rng, jitted


def sharded_memory(request: dict) -> dict[str, Any]:
    """Compiled per-device memory of the SD 1.5 step on an fsdp mesh over every device (one device:
    ``--compile_only``), from abstract arrays only: no weight is allocated, nothing runs."""
    import jax

    from mlmjax import aot
    from mlmjax import sharding

    devices = jax.device_count()
    mesh = sharding.make_mesh({"data": 1, "fsdp": devices, "tensor": 1})
    state, batch, rng, jitted = _abstract_sd15_case(request, mesh, request["case_dir"])
    compiled = aot.compile_step(jitted, state, batch, rng)
    # The MLM variants lower the step twice more; at fsdp=8 only the memory is asked for.
    counted = (_flop_fields(state, batch, rng, request["mlm"] and devices == 1)
               if request.get("count_flops", True) else {"flops": None})
    return {**counted, "method": request["method"], "mlm": request["mlm"], "size": "sd15",
            "compute_dtype": request["compute_dtype"], "remat": bool(request.get("remat", False)),
            "mesh": dict(zip(sharding.AXES, (1, devices, 1))), "devices": devices, **_batch_rows(batch),
            "compile_s": compiled.compile_seconds, "flops_compiled": compiled.flops,
            "compiler_options": compiled.compiler_options, "memory_per_device": compiled.memory,
            "peak_bytes_per_device": None if compiled.memory is None else compiled.memory["peak_bytes"],
            "peak_rss_bytes": bench_torch.peak_rss_bytes()}


def _flop_fields(state, batch, rng, mlm_variants: bool) -> dict[str, Any]:
    """``flops`` (the model's FLOPs per step) and, with ``mlm_variants``, the MLM projection's variants."""
    if mlm_variants:
        variants = mlm_flop_variants(state, batch, rng)
        return {**variants, "flops": variants["flops_lowered_masked"]}
    return {"flops": model_flops(state, batch, rng)}


def count_flops(request: dict) -> dict[str, Any]:
    """The model FLOPs of a JAX row counted on this process's own backend, run on the host's CPU for a
    step timed on an accelerator: XLA's GPU client gives no cost analysis of a lowered step (none on an
    H100, jax 0.11.2), and the model's FLOPs do not depend on the device. SD 1.5 from abstract arrays."""
    import jax

    from mlmjax import sharding

    with tempfile.TemporaryDirectory(prefix="mlmjax-bench-flops-") as scratch:
        if request["size"] == "sd15":
            mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
            state, batch, rng, _ = _abstract_sd15_case(request, mesh, scratch)
        else:
            state, batch, rng, _ = prepare_case(request, scratch)
        counted = _flop_fields(state, batch, rng, request["mlm"])
    return {**counted, "flops_counted_on": jax.default_backend()}
