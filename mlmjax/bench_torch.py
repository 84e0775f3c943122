"""The PyTorch reference train step that ``python -m mlmjax.bench`` times beside mlmjax's.

diffusers ``UNet2DConditionModel`` + transformers ``CLIPTextModel`` + the authors' contextualizer
(``ContextNetV3``, written here in torch) doing what ``mlmjax.train_step.train_step`` does, on CPU:

* new tokens are a separate trainable ``[C, D]`` tensor spliced into the token lookup (and, with
  MLM, the frozen ``[MASK]`` row after them), as mlmjax does; the 49k-row table trains only where
  the method trains the text encoder;
* XTI/P+: one text encoding per concept token, each cross-attention layer given the encoding of its
  token through a per-layer attention processor (diffusers order: down blocks, mid block, up blocks);
* L = L_diff + w_prior · L_prior + λ · CE(contextualizer logits at the masked tokens only);
* AdamW (decoupled weight decay, as ``optax.adamw``), optional global-norm clipping, on exactly the
  parameters that the mlmjax config marks trainable (their PyTorch names come in the case file);
* ``bfloat16`` compute: ``torch.autocast`` over float32 master weights; ``remat``: the UNet's gradient
  checkpointing;
* on the CPU, or on a CUDA GPU (``--device``; by default a GPU where torch sees one), where the peak
  memory is the allocator's (``torch.cuda.max_memory_allocated``).

It reads a *case folder* that the JAX side of the benchmark wrote (``case.json`` and ``arrays.npz``:
the configuration, the batch built by mlmjax's batch function, the random draws of the JAX step's
first call, and at the tiny size the same weights, read from the same diffusers-layout folder), so
both frameworks run the same step on the same batch. The first step uses the JAX step's draws, which
makes its loss comparable to the JAX step's loss; later steps draw with torch.

Run by the benchmark as a subprocess (``python -m mlmjax.bench_torch --case DIR --out ROW.json``), so
that the peak resident memory it reports belongs to one configuration. Importing mlmjax imports jax
(the package's ``__init__``), about 0.1 GB of the resident memory here; this module uses no jax.
torch, diffusers and transformers are imported inside the functions: nothing else in mlmjax imports
this module at import time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

CASE_JSON = "case.json"
ARRAYS_NPZ = "arrays.npz"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# The peak's matrix size (both frameworks): 2048² already saturates a CPU; an accelerator needs 8192².
MATMUL_SIZE = 2048
ACCELERATOR_MATMUL_SIZE = 8192


def matmul_size(platform: str) -> int:
    """The peak's matrix size on ``platform`` ("cpu", or jax's "gpu"/"tpu", torch's "cuda")."""
    return MATMUL_SIZE if platform == "cpu" else ACCELERATOR_MATMUL_SIZE


def resolve_device(name: str) -> str:
    """``"auto"``: ``"cuda"`` where torch sees a GPU, else ``"cpu"``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda: torch sees no CUDA GPU; use --device=cpu")
    return name


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(size: int | None = None, repeats: int = 10, dtype: str = "float32",
                device: str = "cpu") -> dict[str, Any]:
    """Achieved FLOP/s of a ``size × size`` matrix multiply in torch (2048² on a CPU, 8192² on a GPU;
    random operands), in ``dtype`` on ``device``: median of ``repeats``."""
    import torch

    size = size or matmul_size(device)
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype), device=device) for _ in range(2))
    for _ in range(2):
        torch.mm(a, b)
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"size": size, "dtype": dtype, "median_s": median, "flops_per_s": 2 * size**3 / median,
            "threads": torch.get_num_threads(), "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else None}


# ---------------------------------------------------------------------------------------------------
# Modules


def contextualizer_class():
    """The authors' ``ContextNetV3`` in torch (their state-dict names), built from a contextualizer
    ``config.json`` dict; ``tests/test_contextualizer.py`` checks it against the Flax port."""
    import torch
    from torch import nn

    class FeedForward(nn.Module):
        def __init__(self, width: int, ffn_size: int):
            super().__init__()
            self.W_ff1 = nn.Linear(width, ffn_size)
            self.W_ff2 = nn.Linear(ffn_size, width)

        def forward(self, x):
            return self.W_ff2(torch.relu(self.W_ff1(x)))

    class ContextNetV3(nn.Module):
        """The authors' contextualizer (their state-dict names), with the vocabulary projection separate
        (``encode`` then ``final``) so that it runs only at the masked tokens, as mlmjax's does."""

        def __init__(self, config: dict):
            super().__init__()
            self.config = config
            width, blocks = config["hidden_size"], config["num_blocks"]
            self.register_buffer("position_ids", torch.arange(config["num_positions"]).expand((1, -1)))
            self.position_embedding = nn.Embedding(config["num_positions"], width)
            for i in range(1, blocks + 1):
                setattr(self, f"multi_head_attention{i}",
                        nn.MultiheadAttention(width, config["num_heads"], batch_first=True))
                setattr(self, f"layer_norm{i}", nn.LayerNorm(width))
                if i < blocks:
                    setattr(self, f"feed_forward{i}", FeedForward(width, config["ffn_size"]))
            self.final = nn.Linear(width, config["vocab_size"])

        def encode(self, x):
            x = x + self.position_embedding(self.position_ids[:, : x.shape[1]])
            blocks = self.config["num_blocks"]
            for i in range(1, blocks + 1):
                out, _ = getattr(self, f"multi_head_attention{i}")(x, x, x, need_weights=False)
                x = getattr(self, f"layer_norm{i}")(x + out)
                if i < blocks:
                    y = getattr(self, f"feed_forward{i}")(x)
                    x = x + y if self.config.get("ffn_residual", False) else y
            return x

        def forward(self, x):
            return self.final(self.encode(x))

    return ContextNetV3


def _spliced_embedding_class():
    import torch
    from torch import nn

    class SplicedEmbedding(nn.Module):
        """The token lookup with rows past the vocabulary taken from ``extra`` (concept tokens, then
        the frozen [MASK] vector), as ``CLIPTextModel.embed`` in mlmjax."""

        def __init__(self, table: nn.Embedding, concept: torch.Tensor, mask_embedding: torch.Tensor | None):
            super().__init__()
            self.table = table
            self.concept = nn.Parameter(concept)
            self.register_buffer("mask_embedding", None if mask_embedding is None else mask_embedding[None])

        def forward(self, ids):
            vocab = self.table.num_embeddings
            rows = [self.concept] + ([] if self.mask_embedding is None else [self.mask_embedding])
            extra = torch.cat(rows).to(self.table.weight.dtype)
            embeds = self.table(ids.clamp(0, vocab - 1))
            is_extra = ids >= vocab
            spliced = extra[(ids - vocab).clamp(0, extra.shape[0] - 1)]
            return torch.where(is_extra[..., None], spliced, embeds)

    return SplicedEmbedding


def _layer_context_processor_class():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class LayerContext(AttnProcessor2_0):
        """Cross-attention that reads its own layer's context (XTI/P+) instead of the shared one."""

        def __init__(self, holder: dict, index: int):
            super().__init__()
            self.holder, self.index = holder, index

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            return super().__call__(attn, hidden_states, self.holder["contexts"][self.index], *args, **kwargs)

    return LayerContext


def _cross_attention_order(name: str) -> tuple:
    """Sort key of a diffusers attention processor name in mlmjax's layer order (down, mid, up)."""
    parts = name.split(".")
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]]
    numbers = tuple(int(p) for p in parts if p.isdigit())
    return (stage, *numbers)


# ---------------------------------------------------------------------------------------------------
# The step


class TorchStep:
    """The reference step of one case; :meth:`step` runs one optimisation step and returns the loss."""

    def __init__(self, case: dict, arrays: dict[str, np.ndarray], device: str = "cpu"):
        import diffusers
        import safetensors.torch
        import torch
        import transformers

        self.case = case
        seed = int(case["seed"])
        torch.manual_seed(seed)
        model = case["model"]
        if model["kind"] == "folder":  # the same weights as the JAX side (float16 files read as float32)
            self.unet = diffusers.UNet2DConditionModel.from_pretrained(
                os.path.join(model["path"], "unet"), torch_dtype=torch.float32, low_cpu_mem_usage=False)
            self.text_encoder = transformers.CLIPTextModel.from_pretrained(
                os.path.join(model["path"], "text_encoder"), dtype=torch.float32)
        else:  # random weights of the given shapes (PyTorch's own initialisation)
            self.unet = diffusers.UNet2DConditionModel(**model["unet_config"])
            self.text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**model["text_encoder_config"]))
        self.vocab = self.text_encoder.config.vocab_size
        mask_embedding = None
        self.contextualizer = None
        if case["mlm_weight"]:
            folder = case["contextualizer"]
            with open(os.path.join(folder, "config.json")) as f:
                self.contextualizer = contextualizer_class()(json.load(f))
            self.contextualizer.load_state_dict(
                safetensors.torch.load_file(os.path.join(folder, "contextualizer.safetensors")), strict=True)
            mask_embedding = safetensors.torch.load_file(
                os.path.join(folder, "mask_embedding.safetensors"))["mask_embedding"]
            self.contextualizer.requires_grad_(False)
        embeddings = self.text_encoder.embeddings
        embeddings.token_embedding = _spliced_embedding_class()(
            embeddings.token_embedding, torch.from_numpy(np.array(arrays["concept_init"], np.float32)), mask_embedding)
        self._set_trainable(case["trainable"])
        self.layer_tokens = case["layer_tokens"]
        if self.layer_tokens is not None:
            self.holder = {"contexts": None}
            processor = _layer_context_processor_class()
            names = sorted((n for n in self.unet.attn_processors if ".attn2." in n), key=_cross_attention_order)
            if len(names) != len(self.layer_tokens):
                raise ValueError(f"the UNet has {len(names)} cross-attention layers, the case {len(self.layer_tokens)}")
            processors = dict(self.unet.attn_processors)
            processors.update({name: processor(self.holder, i) for i, name in enumerate(names)})
            self.unet.set_attn_processor(processors)
        if case.get("remat"):  # mlmjax's config.remat: recompute the UNet's blocks in the backward pass
            self.unet.enable_gradient_checkpointing()
        self.device = torch.device(device)
        for module in (self.unet, self.text_encoder, self.contextualizer):
            if module is not None:
                module.to(self.device)
        self.unet.train()
        self.text_encoder.train()
        self.alphas_cumprod = torch.tensor(case["alphas_cumprod"], dtype=torch.float32, device=self.device)
        self.params = [p for module in (self.unet, self.text_encoder) for p in module.parameters() if p.requires_grad]
        o = case["optimizer"]
        self.optimizer = torch.optim.AdamW(self.params, lr=case["learning_rate"], betas=(o["b1"], o["b2"]),
                                           eps=o["eps"], weight_decay=o["weight_decay"])
        self.batch = {k.removeprefix("batch/"): torch.from_numpy(np.asarray(v)).to(self.device)
                      for k, v in arrays.items() if k.startswith("batch/")}
        self.first_draws = {k.removeprefix("draws/"): torch.from_numpy(np.asarray(v)).to(self.device)
                            for k, v in arrays.items() if k.startswith("draws/")}
        self.autocast = case["compute_dtype"] == "bfloat16"
        self.calls = 0

    def _set_trainable(self, trainable: dict) -> None:
        for name, module in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            names = set(trainable[name])
            own = {n for n, _ in module.named_parameters()}
            unknown = names - {n.replace("token_embedding.table.", "token_embedding.") for n in own} - own
            if unknown:
                raise ValueError(f"trainable {name} parameters not in the PyTorch model: {sorted(unknown)[:5]}")
            for n, p in module.named_parameters():
                plain = n.replace("token_embedding.table.", "token_embedding.")
                p.requires_grad_(plain in names or n in names)
        self.text_encoder.embeddings.token_embedding.concept.requires_grad_(bool(trainable["concept"]))

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def _encode(self, ids, token_offset: int = 0):
        import torch

        ids = torch.where(ids == self.vocab, self.vocab + token_offset, ids)
        return self.text_encoder(input_ids=ids).last_hidden_state

    def _draws(self, rows: int, latent_shape: tuple[int, ...]) -> dict:
        import torch

        if self.calls == 0 and self.first_draws:
            return self.first_draws
        device = self.device
        return {"sample": torch.randn(rows, *latent_shape, device=device),
                "noise": torch.randn(rows, *latent_shape, device=device),
                "timesteps": torch.randint(0, len(self.alphas_cumprod), (rows,), device=device)}

    def loss(self):
        """The total loss of the current batch (and its parts), with the graph for backward."""
        import torch
        import torch.nn.functional as F

        b = self.batch
        mean, logvar, ids = b["latent_mean"], b["latent_logvar"], b["input_ids"].long()
        if "prior_input_ids" in b:
            mean = torch.cat([mean, b["prior_latent_mean"]])
            logvar = torch.cat([logvar, b["prior_latent_logvar"]])
            ids = torch.cat([ids, b["prior_input_ids"].long()])
        draws = self._draws(mean.shape[0], tuple(mean.shape[1:]))
        latents = (mean + torch.exp(0.5 * logvar) * draws["sample"]) * self.case["scaling_factor"]
        noise, timesteps = draws["noise"], draws["timesteps"].long()
        alpha_bar = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        if self.case["prediction_type"] == "epsilon":
            target = noise
        else:
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.layer_tokens is None:
                context = self._encode(ids)
            else:
                per_token = [self._encode(ids, k) for k in range(max(self.layer_tokens) + 1)]
                self.holder["contexts"] = [per_token[k] for k in self.layer_tokens]
                context = per_token[0]
            prediction = self.unet(noisy.permute(0, 3, 1, 2), timesteps, encoder_hidden_states=context).sample
        per_example = ((prediction.float().permute(0, 2, 3, 1) - target) ** 2).mean(dim=(1, 2, 3))
        instance = b["input_ids"].shape[0]
        parts = {"loss_diff": per_example[:instance].mean()}
        loss = parts["loss_diff"]
        if per_example.shape[0] > instance:
            parts["loss_prior"] = per_example[instance:].mean()
            loss = loss + self.case["prior_weight"] * parts["loss_prior"]
        if self.contextualizer is not None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                hidden = self._encode(b["mlm_input_ids"].long())
                features = self.contextualizer.encode(hidden)
                mask = b["mlm_mask"].bool()
                logits = self.contextualizer.final(features[mask])  # the masked tokens only
            parts["loss_mlm"] = F.cross_entropy(logits.float(), b["mlm_labels"].long()[mask])
            loss = loss + self.case["mlm_weight"] * parts["loss_mlm"]
        parts["loss"] = loss
        return loss, parts

    def step(self) -> dict[str, float]:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = self.loss()
        loss.backward()
        clip = self.case["optimizer"]["grad_clip"]
        if clip:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.calls += 1
        return {name: float(value.detach()) for name, value in parts.items()}


def load_case(case_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    with open(os.path.join(case_dir, CASE_JSON)) as f:
        case = json.load(f)
    with np.load(os.path.join(case_dir, ARRAYS_NPZ)) as data:
        arrays = {k: data[k] for k in data.files}
    return case, arrays


def time_steps(step, *, warmup: int, repeats: int, synchronize=lambda: None) -> tuple[dict[str, float], list[float]]:
    """A reference's timing loop: ``step()`` (one optimisation step, returning its losses) once untimed
    (its losses are returned: the JAX step's first draws), ``warmup - 1`` more untimed, then ``repeats``
    timed, each until ``synchronize()`` returns; a non-finite loss stops the run."""
    first = step()
    times = []
    for i in range(warmup - 1 + repeats):
        start = time.perf_counter()
        losses = step()
        synchronize()
        elapsed = time.perf_counter() - start
        if i >= warmup - 1:
            times.append(elapsed)
        if not math.isfinite(losses["loss"]):
            raise FloatingPointError(f"non-finite loss {losses['loss']} at step {i + 1}")
    return first, times


def time_gradient(loss, args: tuple, *, warmup: int, repeats: int) -> list[float]:
    """Seconds of ``loss(*args)`` and its gradient in ``args[0]``, jitted and compiled on its own, timed as
    :func:`time_steps` times a step: how both JAX sides time the MLM branch alone (``bench --mlm_branch``)."""
    import jax

    compiled = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()

    def one_call() -> dict[str, float]:
        value, grads = compiled(*args)
        jax.block_until_ready(grads)
        return {"loss": float(value)}

    return time_steps(one_call, warmup=warmup, repeats=repeats)[1]


def run_case(case_dir: str, *, warmup: int, repeats: int, device: str = "cpu") -> dict[str, Any]:
    """Builds the reference step of a case folder and times it on ``device``: one row of the benchmark."""
    import torch

    case, arrays = load_case(case_dir)
    start = time.perf_counter()
    step = TorchStep(case, arrays, device)
    build_seconds = time.perf_counter() - start
    rss_before = peak_rss_bytes()
    first, times = time_steps(step.step, warmup=warmup, repeats=repeats, synchronize=lambda: _synchronize(device))
    on_gpu = device == "cuda"
    return {"framework": "torch", "times_s": times, "first_loss": first, "build_s": build_seconds,
            "trainable_params": step.num_trainable(), "peak_rss_bytes": peak_rss_bytes(),
            "rss_before_step_bytes": rss_before, "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__}, "device": device,
            "device_kind": torch.cuda.get_device_name() if on_gpu else None,
            "device_peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one PyTorch row of python -m mlmjax.bench (a subprocess)")
    parser.add_argument("--case", help="a case folder written by the JAX side")
    parser.add_argument("--peak", action="store_true", help="measure the matmul peak instead")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the peak's dtype")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: a CUDA GPU where torch sees one, else the CPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: torch's default")
    parser.add_argument("--out", required=True, help="where the row's JSON is written")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.peak:
        row = matmul_peak(repeats=args.repeats, dtype=args.dtype, device=device)
    else:
        row = run_case(args.case, warmup=max(1, args.warmup), repeats=args.repeats, device=device)
    with open(args.out, "w") as f:
        json.dump(row, f)


if __name__ == "__main__":
    sys.exit(main())
