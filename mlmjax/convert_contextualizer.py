"""Converts the authors' released contextualizer (PyTorch pickles) into an mlmjax folder, once.

Run where PyTorch is installed (mlmjax itself never imports torch)::

    python -m mlmjax.convert_contextualizer --cls_net cls_net_100000_ckpt.pt \\
        --mask_embeds mask_embeds_100000_ckpt.pt --out contextualizer/

``cls_net_*.pt`` is a ``ContextNetV3`` state dict (keys may carry the ``module.`` prefix of the
authors' 2-GPU DistributedDataParallel run); ``mask_embeds_*.pt`` is ``{"[MASK]": tensor [1, D]}``.
Both are read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers
only and refuses to run code from the file. The output folder holds ``config.json``,
``contextualizer.safetensors`` (the authors' key names) and ``mask_embedding.safetensors`` (one tensor
``mask_embedding`` of shape ``[D]``); load it with
:func:`mlmjax.models.contextualizer.load_contextualizer`. The architecture is read off the tensor
shapes, except the number of heads, which the weights do not determine (``--num_heads``, the
authors' 4).
"""

from __future__ import annotations

import argparse
import pickle
import re
from typing import Mapping, Sequence

import numpy as np

from mlmjax import weights
from mlmjax.models import contextualizer

_ATTENTION_KEY = re.compile(r"multi_head_attention(\d+)\.in_proj_weight")


def _to_numpy(tensor) -> np.ndarray:
    """float32 for floating tensors (bf16 has no numpy dtype); integer buffers as they are."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def config_from_state_dict(state_dict: Mapping[str, np.ndarray], num_heads: int,
                           source: str) -> contextualizer.ContextualizerConfig:
    """The architecture of a ``ContextNetV3`` state dict (canonical keys), from its shapes."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise weights.WeightsError(f"{source}: no tensor {key!r}; is this a ContextNetV3 state dict?")
        return tuple(state_dict[key].shape)

    num_positions, hidden_size = shape("position_embedding.weight")
    num_blocks = sum(1 for key in state_dict if _ATTENTION_KEY.fullmatch(key))
    ffn_size = shape("feed_forward1.W_ff1.weight")[0] if num_blocks > 1 else 4 * hidden_size
    try:
        return contextualizer.ContextualizerConfig(
            hidden_size=hidden_size, num_positions=num_positions, num_blocks=num_blocks, num_heads=num_heads,
            ffn_size=ffn_size, vocab_size=shape("final.weight")[0])
    except ValueError as error:
        raise weights.WeightsError(f"{source}: {error}") from None


def _mask_embedding(loaded, hidden_size: int, source: str) -> np.ndarray:
    """The single tensor of the authors' ``{"[MASK]": [1, D]}`` dict, as ``[D]``."""
    if isinstance(loaded, Mapping):
        if len(loaded) != 1:
            raise weights.WeightsError(f"{source}: expected one mask embedding, found keys {sorted(loaded)}")
        (loaded,) = loaded.values()
    array = _to_numpy(loaded)
    if array.size != hidden_size:
        raise weights.WeightsError(f"{source}: mask embedding has shape {tuple(array.shape)}, "
                                   f"expected {hidden_size} values")
    return array.reshape(hidden_size)


def convert(cls_net: Mapping, mask_embeds, out: str, *, num_heads: int = 4,
            sources: tuple[str, str] = ("cls_net", "mask_embeds")) -> contextualizer.ContextualizerConfig:
    """Writes the mlmjax folder ``out`` from the two loaded PyTorch objects; returns the config."""
    if not isinstance(cls_net, Mapping):
        raise weights.WeightsError(f"{sources[0]}: expected a state dict, found {type(cls_net).__name__}")
    state_dict = {contextualizer.rename_checkpoint_key(key): _to_numpy(tensor) for key, tensor in cls_net.items()}
    config = config_from_state_dict(state_dict, num_heads, sources[0])
    params = contextualizer.params_from_state_dict(
        state_dict, contextualizer.Contextualizer(config), sources[0])
    mask_embedding = _mask_embedding(mask_embeds, config.hidden_size, sources[1])
    contextualizer.save_contextualizer(out, config, params, mask_embedding)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cls_net", required=True, help="the authors' cls_net_<step>_ckpt.pt")
    parser.add_argument("--mask_embeds", required=True, help="the authors' mask_embeds_<step>_ckpt.pt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_heads", type=int, default=4, help="attention heads (the authors': 4)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        raise SystemExit("convert_contextualizer needs PyTorch to read .pt files: pip install torch") from None
    try:
        cls_net = torch.load(args.cls_net, map_location="cpu", weights_only=True)
        mask_embeds = torch.load(args.mask_embeds, map_location="cpu", weights_only=True)
        config = convert(cls_net, mask_embeds, args.out, num_heads=args.num_heads,
                         sources=(args.cls_net, args.mask_embeds))
    except (OSError, weights.WeightsError, pickle.UnpicklingError) as error:
        raise SystemExit(f"convert_contextualizer: {error}") from None
    print(f"wrote {args.out}: {config}")


if __name__ == "__main__":
    main()
