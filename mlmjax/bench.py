r"""Benchmarks of the train step: JAX against the PyTorch reference, per method, with and without MLM.

    python -m mlmjax.bench                                     # tiny size, 4 methods x MLM on/off, JAX + PyTorch
    python -m mlmjax.bench --methods ti --mlm off --size sd15 --repeats 2 --json sd15.json
    python -m mlmjax.bench --size sd15 --methods ti,dreambooth --markdown   # README table (minutes, ~20 GB)
    python -m mlmjax.bench --size sd15 --compile_only --methods ti --mlm off   # XLA's memory, no weights
    python -m mlmjax.bench --sharded_memory --methods dreambooth --mlm off --framework none   # fsdp=8 memory

Every configuration runs in its own fresh subprocess (JAX and PyTorch separately), so its peak
resident memory is its own. For each it reports: the median step time over ``--repeats`` steps
after ``--warmup`` (with min, max, quartiles), examples/s (UNet rows per step: instance plus class
images), compile time (cold unless ``--compilation_cache``), FLOPs per step from XLA's cost
analysis, the achieved FLOP/s and its fraction of this machine's float32 matrix-multiply peak
(measured in the same run by both frameworks, 2048², median of 10; the larger is the peak), peak
memory (JAX: the compiled memory analysis, argument + output + temporaries - donated aliases; both:
the subprocess's peak RSS), and the JAX/PyTorch time and memory ratios. PyTorch rows use the JAX
step's FLOPs (the same computation).

Both frameworks run the same configuration on the same batch (built once by mlmjax's batch function
and handed to PyTorch in a case folder). At the tiny size they also share the weights (the embedded
model and contextualizer, read by both) and the random draws of the first step, so their first losses
must agree: the ``loss_rel_error`` column checks that the reference is the same step. At SD 1.5
shapes the weights are random and not shared (timing and memory do not depend on them); the VAE is
not part of the step (latent moments are precomputed), so none is built: latent moments are random.

With MLM on, the MLM branch's FLOPs are reported twice: with the vocabulary projection only at the
masked positions (what the step does: ``max_masked`` rows) and at every position (M × 77 rows, as the
authors' code computes it), from XLA's cost analysis of the step lowered both ways (not compiled);
the projection alone costs 4·N·D·V FLOPs for N rows (forward 2·N·D·V, backward into the features
2·N·D·V; the weights are frozen). ``mlm`` rows compare MLM's extra time with the extra FLOPs it adds.
These are the model's FLOPs, counted on the step lowered with the plain projection: the step runs
the cross-entropy in vocabulary chunks (``mlm.vocabulary_cross_entropy``), a loop whose body XLA's
cost analysis counts once, and recomputes each chunk's logits in the backward pass (2·N·D·V more
FLOPs done than counted).

``--sharded_memory`` lowers DreamBooth at SD 1.5 shapes (UNet + text encoder + token trained, AdamW,
bfloat16 compute, one instance and one class image per device, fsdp=8) from
``jax.ShapeDtypeStruct``\ s with shardings, no weights allocated, in a subprocess with 8 host devices
(``--xla_force_host_platform_device_count=8``), and reports the compiled memory per device.
``--compile_only`` does the same on one device with the method's own batch and ``--compute_dtype``:
XLA's peak memory and FLOPs of an SD 1.5 step on a machine that cannot hold it (nothing is timed).
A JAX step that compiles and then dies (out of memory) keeps its compiled numbers in its row.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any

import numpy as np

from mlmjax import bench_torch
from mlmjax import runtime

METHODS = ("ti", "xti", "dreambooth", "custom_diffusion")
SIZES = ("tiny", "sd15")
FRAMEWORKS = ("jax", "torch")
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
MATMUL_SIZE = 2048
REQUEST_JSON = "request.json"
ROW_JSON = "row.json"
PARTIAL_SUFFIX = ".compiled"

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

ROW_FIELDS = ("method", "mlm", "size", "framework", "compute_dtype", "batch", "prior_batch", "mlm_batch",
              "examples_per_step", "median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "examples_per_s",
              "flops", "achieved_flops_per_s", "peak_fraction", "peak_memory_bytes", "peak_rss_bytes")


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


def jax_matmul_peak(size: int = MATMUL_SIZE, repeats: int = 10) -> dict[str, float]:
    """Achieved FLOP/s of a jitted float32 ``size × size`` matrix multiply: median of ``repeats``."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (size, size), jnp.float32) for k in keys)
    matmul = jax.jit(jnp.matmul)
    for _ in range(2):
        matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"size": size, "median_s": median, "flops_per_s": 2 * size**3 / median}


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


def load_config(method: str, configs_dir: str = CONFIGS_DIR):
    """``configs/<method>.py``'s ``get_config()``."""
    path = os.path.join(configs_dir, f"{method}.py")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such config; --configs must be the repository's configs/ folder")
    spec = importlib.util.spec_from_file_location(f"mlmjax_bench_config_{method}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _torch_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def build_model(size: str, seed: int = 0):
    """``(Pretrained, how PyTorch builds the same networks)`` for the tiny size or SD 1.5 shapes."""
    from mlmjax import pretrained as pretrained_lib
    from mlmjax import tiny
    from mlmjax import tokenizer as tokenizer_lib

    if size == "tiny":
        folder = tiny.embedded_assets().model
        return pretrained_lib.load_pretrained(folder), {"kind": "folder", "path": folder}
    modules = {"text_encoder": pretrained_lib.build_component("text_encoder", SD15_TEXT_ENCODER_CONFIG),
               "unet": pretrained_lib.build_component("unet", SD15_UNET_CONFIG)}
    params = {name: pretrained_lib.init_component(name, module, seed + i) for i, (name, module) in
              enumerate(modules.items())}
    params["vae"] = {}
    model = pretrained_lib.Pretrained(tokenizer=tokenizer_lib.vendored_tokenizer(), vae=_RandomMoments(),
                                      scheduler_config=dict(tiny.SCHEDULER_CONFIG), params=params, **modules)
    return model, {"kind": "random", "unet_config": _torch_config(SD15_UNET_CONFIG),
                   "text_encoder_config": _torch_config(SD15_TEXT_ENCODER_CONFIG)}


def abstract_sd15_model():
    """SD 1.5 shapes with ``jax.ShapeDtypeStruct`` parameters: nothing allocated."""
    from mlmjax import pretrained as pretrained_lib
    from mlmjax import tiny
    from mlmjax import tokenizer as tokenizer_lib

    modules = {"text_encoder": pretrained_lib.build_component("text_encoder", SD15_TEXT_ENCODER_CONFIG),
               "unet": pretrained_lib.build_component("unet", SD15_UNET_CONFIG)}
    params = {name: pretrained_lib.abstract_params(name, module) for name, module in modules.items()}
    params["vae"] = {}
    return pretrained_lib.Pretrained(tokenizer=tokenizer_lib.vendored_tokenizer(), vae=_RandomMoments(),
                                     scheduler_config=dict(tiny.SCHEDULER_CONFIG), params=params, **modules)


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


def method_config(method: str, mlm: bool, compute_dtype: str, configs_dir: str = CONFIGS_DIR, remat: bool = False):
    from mlmjax import tiny

    config = load_config(method, configs_dir)
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
        "scaling_factor": spec.scaling_factor, "prior_weight": spec.prior_weight, "mlm_weight": spec.mlm_weight,
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


def _lowered_flops(state, batch, rng) -> float | None:
    """XLA's FLOPs of the step lowered with the plain vocabulary projection: XLA's cost analysis
    counts the body of the chunked cross-entropy's loop once, not once per chunk."""
    import jax

    from mlmjax import aot
    from mlmjax import train_step as train_step_lib

    state = state.replace(spec=dataclasses.replace(state.spec, vocab_chunk=None))
    return aot.flops(jax.jit(train_step_lib.train_step).lower(state, batch, rng))


def mlm_flop_variants(state, batch, rng) -> dict[str, Any]:
    """XLA's FLOPs of the step lowered with the vocabulary projection at the masked positions
    (``max_masked`` rows, as the step runs) and at every position of the MLM batch, and the
    projection's analytic cost 4·N·D·V for each."""
    spec = state.spec
    rows, length = batch["mlm_input_ids"].shape
    every = rows * length
    masked = _lowered_flops(state, batch, rng)
    everywhere = _lowered_flops(state.replace(spec=dataclasses.replace(spec, max_masked=every)), batch, rng)
    width, vocab = spec.contextualizer.config.hidden_size, spec.contextualizer.config.vocab_size
    return {"mlm_positions_masked": spec.max_masked, "mlm_positions_all": every,
            "flops_lowered_masked": masked, "flops_lowered_all_positions": everywhere,
            "projection_flops_masked": 4 * spec.max_masked * width * vocab,
            "projection_flops_all_positions": 4 * every * width * vocab}


def _batch_rows(batch: dict) -> dict[str, int]:
    return {"batch": int(batch["input_ids"].shape[0]),
            "prior_batch": int(batch["prior_input_ids"].shape[0]) if "prior_input_ids" in batch else 0,
            "mlm_batch": int(batch["mlm_input_ids"].shape[0]) if "mlm_input_ids" in batch else 0}


def run_jax_case(request: dict, case_dir: str, partial: str | None = None) -> dict[str, Any]:
    """One JAX row: prepare the case (and the folder PyTorch reads), compile, time; the row so far is
    written to ``partial`` once compiled."""
    import jax

    from mlmjax import aot
    from mlmjax import sharding
    from mlmjax import train_step as train_step_lib

    start = time.perf_counter()
    state, batch, rng, built = prepare_case(request, case_dir)
    row: dict[str, Any] = {"framework": "jax", "build_s": time.perf_counter() - start, **_batch_rows(batch)}
    if request.get("prepare_only"):
        return row
    from mlmjax import trainable

    row["trainable_params"] = trainable.count(state.params)
    # Jitted as the trainer jits it (one device here); the batch is put on the device once.
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    state = sharding.shard_state(state, mesh)
    device_batch = sharding.shard_batch(batch, mesh)
    jitted = sharding.jit_step(train_step_lib.train_step, state, mesh)
    compiled = aot.compile_step(jitted, state, device_batch, rng)
    row.update(compile_s=compiled.compile_seconds, flops=compiled.flops, memory=compiled.memory,
               peak_memory_bytes=None if compiled.memory is None else compiled.memory["peak_bytes"])
    if request["mlm"]:
        row.update(mlm_flop_variants(state, device_batch, rng))
        row["flops"] = row["flops_lowered_masked"]  # the compiled step's count misses 12 of 13 chunks
    if partial:  # what the compiler says survives a step that runs out of memory
        with open(partial, "w") as f:
            json.dump(row, f)
    rss_before = bench_torch.peak_rss_bytes()
    state, metrics = compiled(state, device_batch, rng)
    first = {k: float(v) for k, v in metrics.items() if k.startswith("loss")}
    times = []
    warmup, repeats = max(1, request["warmup"]), request["repeats"]
    for i in range(warmup - 1 + repeats):
        begin = time.perf_counter()
        state, metrics = compiled(state, device_batch, rng)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - begin
        if i >= warmup - 1:
            times.append(elapsed)
        if not math.isfinite(float(metrics["loss"])):
            raise FloatingPointError(f"non-finite loss {float(metrics['loss'])} at step {i + 1}")
    row.update(times_s=times, first_loss=first, rss_before_step_bytes=rss_before,
               peak_rss_bytes=bench_torch.peak_rss_bytes(), max_masked=built.max_masked)
    return row


def sharded_memory(request: dict) -> dict[str, Any]:
    """Compiled per-device memory of the SD 1.5 step on an fsdp mesh over every device (one device:
    ``--compile_only``), from abstract arrays only: no weight is allocated, nothing runs."""
    import jax

    from mlmjax import aot
    from mlmjax import method as method_lib
    from mlmjax import sharding
    from mlmjax import train_step as train_step_lib

    devices = jax.device_count()
    mesh = sharding.make_mesh({"data": 1, "fsdp": devices, "tensor": 1})
    config = method_config(request["method"], request["mlm"], request["compute_dtype"], request["configs"],
                           request.get("remat", False))
    if request.get("per_device_batch"):
        config.batch_size = request["per_device_batch"] * devices
    model = abstract_sd15_model()
    contextualizer = random_contextualizer(os.path.join(request["case_dir"], "contextualizer")) if request["mlm"] else None
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
    compiled = aot.compile_step(jitted, state, abstract_batch, rng)
    variants = mlm_flop_variants(state, abstract_batch, rng) if request["mlm"] and devices == 1 else {}
    flops = compiled.flops  # the compiled count misses all but one chunk of the MLM cross-entropy:
    if request["mlm"]:  # the plain projection's lowering, already made for the variants on one device
        flops = variants["flops_lowered_masked"] if variants else _lowered_flops(state, abstract_batch, rng)
    return {**variants, "method": request["method"], "mlm": request["mlm"], "size": "sd15", "compute_dtype": config.compute_dtype,
            "remat": bool(request.get("remat", False)),
            "mesh": dict(zip(sharding.AXES, (1, devices, 1))), "devices": devices, **_batch_rows(batch),
            "compile_s": compiled.compile_seconds, "flops": flops, "memory_per_device": compiled.memory,
            "peak_bytes_per_device": None if compiled.memory is None else compiled.memory["peak_bytes"],
            "peak_rss_bytes": bench_torch.peak_rss_bytes()}


# ---------------------------------------------------------------------------------------------------
# The driver: one subprocess per configuration


def _worker(args: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[dict | None, str | None]:
    """Runs ``python args...`` and reads the row it wrote; ``(row, None)`` or ``(None, error)``."""
    with tempfile.TemporaryDirectory(prefix="mlmjax-bench-row-") as tmp:
        out = os.path.join(tmp, ROW_JSON)
        try:
            proc = subprocess.run([sys.executable, *args, "--out", out], env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout} s"
        if proc.returncode or not os.path.isfile(out):
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else (lines[-1] if lines else "")
            error = f"exit status {proc.returncode}: {reason}"[:500]
            if os.path.isfile(out + PARTIAL_SUFFIX):  # compiled, then failed: keep the compiler's numbers
                with open(out + PARTIAL_SUFFIX) as f:
                    return {**json.load(f), "error": error}, error
            return None, error
        with open(out) as f:
            return json.load(f), None


def _jax_worker_args(kind: str, request_path: str | None = None) -> list[str]:
    args = ["-m", "mlmjax.bench", f"--worker={kind}"]
    return args + ([f"--request={request_path}"] if request_path else [])


def _summary(times: list[float]) -> dict[str, float]:
    ms = sorted(1000 * t for t in times)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "q1_ms": q[0], "q3_ms": q[2]}


def _finish_row(row: dict, base: dict, peak: float | None, jax_row: dict | None) -> dict:
    row = {**base, **row}
    if row["framework"] == "torch":
        for key in ("batch", "prior_batch", "mlm_batch"):
            row.setdefault(key, (jax_row or {}).get(key))
    if "times_s" in row:
        row.update(_summary(row["times_s"]))
        if row.get("batch") is not None:
            row["examples_per_step"] = row["batch"] + row["prior_batch"]
            row["examples_per_s"] = row["examples_per_step"] / (row["median_ms"] / 1000)
    if row["framework"] == "torch":
        row["flops"] = (jax_row or {}).get("flops")
        row["flops_source"] = "jax cost analysis of the same step"
        row["peak_memory_bytes"] = row.get("peak_rss_bytes")
        row["peak_memory_source"] = "peak RSS of the subprocess"
    elif row.get("flops") is not None:
        row["flops_source"] = "XLA cost analysis (compiled)"
        row["peak_memory_source"] = "compiled memory analysis (argument + output + temp - alias)"
    if row.get("flops") and row.get("median_ms"):
        row["achieved_flops_per_s"] = row["flops"] / (row["median_ms"] / 1000)
        row["peak_fraction"] = row["achieved_flops_per_s"] / peak if peak else None
    for key in ROW_FIELDS:
        row.setdefault(key, None)
    return row


def _compare(jax_row: dict, torch_row: dict) -> None:
    """JAX/PyTorch ratios, written into the JAX row; and at the tiny size, the loss agreement."""
    if jax_row.get("median_ms") and torch_row.get("median_ms"):
        jax_row["time_ratio_jax_over_torch"] = jax_row["median_ms"] / torch_row["median_ms"]
        jax_row["speedup_over_torch"] = torch_row["median_ms"] / jax_row["median_ms"]
    if jax_row.get("peak_memory_bytes") and torch_row.get("peak_rss_bytes"):
        jax_row["memory_ratio_jax_over_torch"] = jax_row["peak_memory_bytes"] / torch_row["peak_rss_bytes"]
        jax_row["rss_ratio_jax_over_torch"] = jax_row["peak_rss_bytes"] / torch_row["peak_rss_bytes"]
    if jax_row.get("trainable_params") is not None and torch_row.get("trainable_params") is not None:
        jax_row["trainable_params_match"] = jax_row["trainable_params"] == torch_row["trainable_params"]
    if jax_row.get("first_loss") and torch_row.get("first_loss") and jax_row["size"] == "tiny":
        # The largest relative difference over the loss and its parts (diffusion, prior, MLM).
        error = max(abs(value - torch_row["first_loss"][name]) / max(abs(torch_row["first_loss"][name]), 1e-30)
                    for name, value in jax_row["first_loss"].items())
        jax_row["loss_rel_error"] = torch_row["loss_rel_error"] = error


def mlm_rows(rows: list[dict]) -> list[dict]:
    """MLM's extra step time and extra FLOPs, per method and framework (rows with MLM on and off)."""
    out = []
    index = {(r["method"], r["mlm"], r["framework"], r["size"]): r for r in rows if r.get("median_ms")}
    for (method, mlm, framework, size), on in index.items():
        off = index.get((method, False, framework, size))
        if not mlm or off is None:
            continue
        entry = {"method": method, "size": size, "framework": framework, "mlm_batch": on.get("mlm_batch"),
                 "extra_time": on["median_ms"] / off["median_ms"] - 1}
        jax_on = index.get((method, True, "jax", size), on)
        jax_off = index.get((method, False, "jax", size), off)
        if jax_on.get("flops") and jax_off.get("flops"):
            masked = jax_on["flops"] - jax_off["flops"]
            entry.update(mlm_flops_masked=masked, extra_flops=masked / jax_off["flops"],
                         flops_share=masked / jax_on["flops"],
                         time_share=(on["median_ms"] - off["median_ms"]) / on["median_ms"])
            lowered_all, lowered_masked = jax_on.get("flops_lowered_all_positions"), jax_on.get("flops_lowered_masked")
            if lowered_all and lowered_masked:
                everywhere = masked + lowered_all - lowered_masked
                entry.update(mlm_flops_all_positions=everywhere, extra_flops_all_positions=everywhere / jax_off["flops"],
                             mlm_positions_masked=jax_on.get("mlm_positions_masked"),
                             mlm_positions_all=jax_on.get("mlm_positions_all"),
                             projection_flops_masked=jax_on.get("projection_flops_masked"),
                             projection_flops_all_positions=jax_on.get("projection_flops_all_positions"))
        out.append(entry)
    return out


def run(options: dict) -> dict[str, Any]:
    """The whole benchmark; ``options``: methods, mlm (list of bools), size, repeats, warmup, frameworks,
    compute_dtype, configs, sharded_memory, compilation_cache, log (a callable for progress lines)."""
    log = options.get("log") or (lambda message: None)
    machine = describe_machine()
    env = dict(os.environ)
    if not options.get("compilation_cache"):
        env["MLMJAX_BENCH_NO_CACHE"] = "1"
    peaks = {}
    for framework in options["frameworks"]:
        repeats = options.get("peak_repeats", 10)
        args = (_jax_worker_args("peak") + [f"--peak_repeats={repeats}"] if framework == "jax" else
                ["-m", "mlmjax.bench_torch", "--peak", f"--repeats={repeats}", f"--threads={options.get('torch_threads', 0)}"])
        peaks[framework], error = _worker(args, env)
        log(f"{framework} matmul peak: " + (f"{peaks[framework]['flops_per_s'] / 1e9:.1f} GFLOP/s" if peaks[framework]
                                           else f"failed ({error})"))
    measured = [p["flops_per_s"] for p in peaks.values() if p]
    peak = max(measured) if measured else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlmjax-bench-") as tmp:
        for method in options["methods"]:
            for mlm in options["mlm"]:
                case_dir = os.path.join(tmp, f"{options['size']}-{method}-{'mlm' if mlm else 'plain'}")
                os.makedirs(case_dir)
                request = {"method": method, "mlm": mlm, "size": options["size"], "repeats": options["repeats"],
                           "warmup": options["warmup"], "compute_dtype": options["compute_dtype"],
                           "configs": options["configs"], "prepare_only": "jax" not in options["frameworks"],
                           "remat": options.get("remat", False)}
                request_path = os.path.join(case_dir, REQUEST_JSON)
                with open(request_path, "w") as f:
                    json.dump(request, f)
                base = {"method": method, "mlm": mlm, "size": options["size"], "compute_dtype": options["compute_dtype"],
                        "repeats": options["repeats"], "warmup": options["warmup"], "remat": options.get("remat", False)}
                prepared, error = _worker(_jax_worker_args("jax", request_path) + [f"--case={case_dir}"], env)
                jax_row = torch_row = None
                if "jax" in options["frameworks"]:
                    jax_row = _finish_row(prepared or {"framework": "jax", "error": error}, base, peak, None)
                    rows.append(jax_row)
                    log(_progress(jax_row))
                if "torch" in options["frameworks"]:
                    if not os.path.isfile(os.path.join(case_dir, bench_torch.CASE_JSON)):
                        result, error = None, f"no case folder: the JAX side failed ({error})"
                    else:
                        result, error = _worker(["-m", "mlmjax.bench_torch", f"--case={case_dir}",
                                                 f"--warmup={options['warmup']}", f"--repeats={options['repeats']}",
                                                 f"--threads={options.get('torch_threads', 0)}"], env)
                    torch_row = _finish_row(result or {"framework": "torch", "error": error}, base, peak,
                                            jax_row or prepared or {})
                    rows.append(torch_row)
                    log(_progress(torch_row))
                if jax_row and torch_row:
                    _compare(jax_row, torch_row)
        sharded = []
        kinds = []
        if options.get("compile_only"):  # one device, the method's own batch, --compute_dtype
            kinds.append((1, options["compute_dtype"], None))
        if options.get("sharded_memory"):  # fsdp over fake devices, bf16, one example per device
            kinds.append((options.get("sharded_devices", 8), "bfloat16", 1))
        for devices, dtype, per_device_batch in kinds:
            sharded_env = env if devices == 1 else dict(env, XLA_FLAGS=(
                env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip())
            for method in options["methods"]:
                for mlm in options["mlm"]:
                    case_dir = os.path.join(tmp, f"abstract{devices}-{method}-{'mlm' if mlm else 'plain'}")
                    os.makedirs(case_dir)
                    request = {"method": method, "mlm": mlm, "compute_dtype": dtype,
                               "per_device_batch": per_device_batch, "configs": options["configs"],
                               "case_dir": case_dir, "remat": options.get("remat", False)}
                    request_path = os.path.join(case_dir, REQUEST_JSON)
                    with open(request_path, "w") as f:
                        json.dump(request, f)
                    result, error = _worker(_jax_worker_args("sharded", request_path), sharded_env)
                    entry = result or {"method": method, "mlm": mlm, "devices": devices, "compute_dtype": dtype,
                                       "error": error}
                    sharded.append(entry)
                    log(f"compiled on {devices} device(s) {method} mlm={mlm}: " + (
                        f"{_fmt(entry['peak_bytes_per_device'], '.2f', 2**30)} GiB per device" if result else error))
    machine["load_average_end"] = list(os.getloadavg())
    return {"machine": machine, "matmul_peak": {"jax": peaks.get("jax"), "torch": peaks.get("torch"),
                                                "flops_per_s": peak},
            "rows": rows, "mlm": mlm_rows(rows), "sharded_memory": sharded}


def _progress(row: dict) -> str:
    name = f"{row['size']} {row['method']} mlm={'on' if row['mlm'] else 'off'} {row['framework']}"
    if row.get("error"):
        return f"{name}: failed: {row['error']}"
    return f"{name}: {row['median_ms']:.1f} ms/step" + (f", loss {row['first_loss']['loss']:.6g}"
                                                         if row.get("first_loss") else "")


# ---------------------------------------------------------------------------------------------------
# Markdown


def _fmt(value, spec: str = ".3g", scale: float = 1.0, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value / scale, spec)


def markdown(result: dict) -> str:
    """README-ready tables: the machine, the step rows, MLM's cost, the sharded memory."""
    m = result["machine"]
    peak = result["matmul_peak"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average'][0]:.1f} at start, "
             f"{m.get('load_average_end', [float('nan')])[0]:.1f} at end; {versions}; "
             f"XLA_FLAGS={m['xla_flags'] or '(none)'}; {m['date']}."]
    peaks = [f"{fw} {_fmt(peak[fw]['flops_per_s'], '.1f', 1e9)} GFLOP/s" for fw in FRAMEWORKS if peak.get(fw)]
    threads = sorted({r["threads"] for r in result["rows"] if r.get("threads")})
    if peaks:
        lines.append(f"Float32 {MATMUL_SIZE}² matmul peak: {', '.join(peaks)}."
                     + (f" PyTorch intra-op threads: {', '.join(map(str, threads))}." if threads else ""))
    lines.append("")
    if result["rows"]:
        lines += ["| size | method | MLM | framework | batch (+prior, MLM) | step ms median [IQR] | examples/s | "
                  "compile s | GFLOP/step | GFLOP/s (% peak) | peak memory GB | RSS GB | JAX/PyTorch time | first loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            head = f"| {r['size']} | {r['method']} | {'on' if r['mlm'] else 'off'} | {r['framework']} |"
            if r.get("error"):
                compiled = (f" (compiled: {_fmt(r.get('compile_s'), '.0f')} s, {_fmt(r.get('flops'), '.3g', 1e9)} "
                            f"GFLOP/step, peak {_fmt(r.get('peak_memory_bytes'), '.2f', 1e9)} GB)"
                            if r.get("peak_memory_bytes") else "")
                lines.append(f"{head} failed: {r['error']}{compiled} |||||||||")
                continue
            batch = f"{r['batch']}" + (f" (+{r['prior_batch']}" if r['prior_batch'] else " (+0") + \
                f", {r['mlm_batch']})"
            fraction = r.get("peak_fraction")
            loss = r.get("first_loss", {}).get("loss")
            loss_text = _fmt(loss, ".5g") + (f" (Δ {r['loss_rel_error']:.1e})" if r.get("loss_rel_error") is not None
                                              else "")
            lines.append(
                f"{head} {batch} | {r['median_ms']:.1f} [{r['q1_ms']:.1f}–{r['q3_ms']:.1f}] | "
                f"{_fmt(r['examples_per_s'])} | {_fmt(r.get('compile_s'), '.1f')} | {_fmt(r['flops'], '.3g', 1e9)} | "
                f"{_fmt(r['achieved_flops_per_s'], '.1f', 1e9)} ({_fmt(fraction, '.0%')}) | "
                f"{_fmt(r['peak_memory_bytes'], '.2f', 1e9)} | {_fmt(r['peak_rss_bytes'], '.2f', 1e9)} | "
                f"{_fmt(r.get('time_ratio_jax_over_torch'), '.2f')} | {loss_text} |")
    if result["mlm"]:
        lines += ["", "| size | method | framework | MLM batch | extra step time | extra FLOPs (masked only) | "
                  "extra FLOPs (every position) | MLM share of time / of FLOPs |", "|---|---|---|---|---|---|---|---|"]
        for e in result["mlm"]:
            lines.append(f"| {e['size']} | {e['method']} | {e['framework']} | {e['mlm_batch']} | "
                         f"{e['extra_time']:+.1%} | {_fmt(e.get('extra_flops'), '+.1%')} | "
                         f"{_fmt(e.get('extra_flops_all_positions'), '+.1%')} | "
                         f"{_fmt(e.get('time_share'), '.1%')} / {_fmt(e.get('flops_share'), '.1%')} |")
    if result["sharded_memory"]:
        lines += ["", "| compiled only (SD 1.5 shapes, no weights) | MLM | compute | mesh | batch (+prior) per step | "
                  "peak GiB per device | args / temp GiB | GFLOP/step | compile s |", "|---|---|---|---|---|---|---|---|---|"]
        for s in result["sharded_memory"]:
            dtype = f"{s.get('compute_dtype')}{' + remat' if s.get('remat') else ''}"
            head = f"| {s['method']} | {'on' if s['mlm'] else 'off'} | {dtype} | fsdp={s.get('devices')} |"
            if s.get("error"):
                lines.append(f"{head} failed: {s['error']} |||||")
                continue
            mem = s["memory_per_device"] or {}
            lines.append(f"{head} {s['batch']} (+{s['prior_batch']}) | {_fmt(s['peak_bytes_per_device'], '.2f', 2**30)} | "
                         f"{_fmt(mem.get('argument'), '.2f', 2**30)} / {_fmt(mem.get('temp'), '.2f', 2**30)} | "
                         f"{_fmt(s.get('flops'), '.4g', 1e9)} | {s['compile_s']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The command


def _worker_main(kind: str, request_path: str | None, case_dir: str | None, out: str, peak_repeats: int = 10) -> None:
    """The subprocess side: one measurement, written as JSON to ``out``."""
    if not os.environ.get("MLMJAX_BENCH_NO_CACHE"):
        runtime.enable_compilation_cache()
    request = {"peak_repeats": peak_repeats}
    if request_path:
        with open(request_path) as f:
            request = json.load(f)
    if kind == "peak":
        row = jax_matmul_peak(repeats=request.get("peak_repeats", 10))
    elif kind == "jax":
        row = run_jax_case(request, case_dir, partial=out + PARTIAL_SUFFIX)
    elif kind == "sharded":
        row = sharded_memory(request)
    else:
        raise ValueError(f"unknown worker {kind!r}")
    with open(out, "w") as f:
        json.dump(row, f)


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        runtime.fail(f"--{flag}={value}: choose from {','.join(allowed)}")
    return items


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing this module defines none."""
    from absl import flags

    flags.DEFINE_string("methods", ",".join(METHODS), "comma-separated methods")
    flags.DEFINE_string("mlm", "on,off", "MLM on, off or both (on,off)")
    flags.DEFINE_enum("size", "tiny", SIZES, "tiny: the embedded model; sd15: SD 1.5 shapes, random weights")
    flags.DEFINE_integer("repeats", 5, "timed steps per configuration (the median is reported)")
    flags.DEFINE_integer("warmup", 2, "untimed steps first (at least 1: the first call)")
    flags.DEFINE_string("framework", "jax,torch", "jax, torch, both, or none (only --sharded_memory)")
    flags.DEFINE_enum("compute_dtype", "float32", ("float32", "bfloat16"), "compute dtype of both frameworks")
    flags.DEFINE_bool("sharded_memory", False, "also compile the SD 1.5 step on 8 fake devices (fsdp=8, bf16, "
                      "batch 1 per device) for each method and MLM setting, and report its memory per device")
    flags.DEFINE_bool("compile_only", False, "SD 1.5 shapes: compile each step on one device from abstract "
                      "arrays (no weights, no steps) and report XLA's memory and FLOPs: for a machine without the "
                      "memory to run it")
    flags.DEFINE_integer("peak_repeats", 10, "timed matmuls of the peak measurement (the median is the peak)")
    flags.DEFINE_bool("remat", False, "JAX: config.remat (recompute UNet blocks in the backward pass)")
    flags.DEFINE_integer("sharded_devices", 8, "host devices (= fsdp size) of --sharded_memory")
    flags.DEFINE_string("json", None, "write the rows (and the machine) to this JSON file")
    flags.DEFINE_bool("markdown", False, "print README-ready tables")
    flags.DEFINE_bool("compilation_cache", False, "use the persistent compilation cache (compile s then measures a "
                      "cache load); off: compile times are cold")
    flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads; 0: its default (one per core). On a busy "
                         "machine 1 avoids a 10-50x slowdown from threads waiting on each other")
    flags.DEFINE_string("configs", CONFIGS_DIR, "the folder of method configs (the repository's configs/)")
    # Internal: what the subprocesses run.
    flags.DEFINE_enum("worker", None, ("peak", "jax", "sharded"), "internal: run one measurement")
    flags.DEFINE_string("request", None, "internal")
    flags.DEFINE_string("case", None, "internal")
    flags.DEFINE_string("out", None, "internal")


def main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.worker:
        _worker_main(f.worker, f.request, f.case, f.out, f.peak_repeats)
        return
    runtime.quiet_library_logs()
    frameworks = [] if f.framework == "none" else _split(f.framework, FRAMEWORKS, "framework")
    if f.compile_only:
        if f.size != "sd15":
            runtime.fail("--compile_only compiles SD 1.5 shapes: add --size=sd15")
        frameworks = []
    if not frameworks and not (f.sharded_memory or f.compile_only):
        runtime.fail("--framework=none measures nothing without --sharded_memory or --compile_only")
    if f.repeats < 1 or f.warmup < 1:
        runtime.fail(f"--repeats={f.repeats} and --warmup={f.warmup} must be at least 1")
    options = {"methods": _split(f.methods, METHODS, "methods"),
               "mlm": [m == "on" for m in _split(f.mlm, ("on", "off"), "mlm")],
               "size": f.size, "repeats": f.repeats, "warmup": f.warmup, "frameworks": frameworks,
               "compute_dtype": f.compute_dtype, "configs": f.configs, "sharded_memory": f.sharded_memory,
               "sharded_devices": f.sharded_devices, "compilation_cache": f.compilation_cache,
               "torch_threads": f.torch_threads, "compile_only": f.compile_only, "remat": f.remat,
               "peak_repeats": f.peak_repeats,
               "log": lambda message: print(message, file=sys.stderr, flush=True)}
    if not os.path.isdir(f.configs):
        runtime.fail(f"--configs={f.configs}: not a folder; point it at the repository's configs/")
    result = run(options)
    if f.json:
        with open(f.json, "w") as out:
            json.dump(result, out, indent=1)
    if f.markdown or not f.json:
        print(markdown(result))
    failed = [r for r in result["rows"] + result["sharded_memory"] if r.get("error")]
    if failed:
        runtime.fail(f"{len(failed)} configuration(s) failed; see the rows")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main, flags_parser=runtime.parse_flags)
