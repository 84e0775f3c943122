"""One strict, two-way map between Flax parameter trees and PyTorch state dicts.

mlmjax's Flax modules are named after the diffusers/transformers attributes they port, so the map is
derived from the parameter tree itself rather than from a hand-written table:

* a module path ``down_blocks_1/attentions_0/proj_in`` becomes ``down_blocks.1.attentions.0.proj_in``
  (``name_N`` turns into ``name.N`` only for the list containers in ``_LIST_CONTAINERS``, so that
  ``time_embedding/linear_1`` stays ``time_embedding.linear_1``);
* leaves: ``kernel`` → ``weight`` (Linear: transposed; Conv: HWIO ↔ OIHW), ``scale`` → ``weight``,
  ``embedding`` → ``weight``, anything else keeps its name.

Loading is strict: every tensor of the checkpoint must land somewhere and every parameter must be
filled with a tensor of the right shape, otherwise a :class:`WeightsError` names the key. Nothing here
unpickles: only safetensors files are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Mapping

import numpy as np
import safetensors.numpy

from mlmjax import files

# PyTorch attributes that are nn.ModuleList / nn.Sequential: their children are addressed by index.
_LIST_CONTAINERS = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "upsamplers", "downsamplers",
    "transformer_blocks", "layers", "to_out", "net",
    "layer",  # transformers' BERT-style encoders (ViT): encoder.layer.0
})
_INDEXED = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class WeightsError(ValueError):
    """A checkpoint does not fit the model; the message names the file or key and what to do."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    torch_key: str
    layout: str  # "linear", "conv" or "copy"
    flax_shape: tuple[int, ...]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        s = self.flax_shape
        if self.layout == "linear":
            return (s[1], s[0])
        if self.layout == "conv":  # HWIO -> OIHW
            return (s[3], s[2], s[0], s[1])
        return s


def _torch_name(segment: str) -> str:
    match = _INDEXED.match(segment)
    if match and match["name"] in _LIST_CONTAINERS:
        return f"{match['name']}.{match['index']}"
    return segment


def _entry(path: tuple[str, ...], shape: tuple[int, ...]) -> _Entry:
    *modules, leaf = path
    if leaf == "kernel":
        layout = {2: "linear", 4: "conv"}.get(len(shape))
        if layout is None:
            raise ValueError(f"kernel {'/'.join(path)} has rank {len(shape)}; expected 2 or 4")
        torch_leaf = "weight"
    elif leaf in ("scale", "embedding"):
        layout, torch_leaf = "copy", "weight"
    else:
        layout, torch_leaf = "copy", leaf
    key = ".".join([_torch_name(m) for m in modules] + [torch_leaf])
    return _Entry(key, layout, tuple(shape))


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (name,)))
        else:
            flat[prefix + (name,)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def key_map(abstract_params: Mapping) -> dict[tuple[str, ...], _Entry]:
    """Flax path → PyTorch key, layout and shape, for every leaf of a (possibly abstract) tree."""
    return {path: _entry(path, tuple(leaf.shape)) for path, leaf in _flatten(abstract_params).items()}


def _to_flax(array: np.ndarray, entry: _Entry) -> np.ndarray:
    if entry.layout == "linear":
        if array.ndim == 4 and array.shape[2:] == (1, 1):  # a 1×1 conv stored where a Linear is used
            array = array[:, :, 0, 0]
        return array.T
    if entry.layout == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def _to_torch(array: np.ndarray, entry: _Entry) -> np.ndarray:
    if entry.layout == "linear":
        return array.T
    if entry.layout == "conv":
        return array.transpose(3, 2, 0, 1)
    return array


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Mapping,
    *,
    source: str,
    dtype=np.float32,
    rename: Callable[[str], str] | None = None,
    ignore: Iterable[str] = (),
) -> dict:
    """Builds a Flax parameter tree from a PyTorch state dict, strictly.

    Args:
      state_dict: PyTorch key → array (PyTorch layout).
      abstract_params: the module's parameter tree (arrays or ``jax.ShapeDtypeStruct``), used for
        names and shapes only.
      source: the file or folder the tensors came from, for error messages.
      dtype: the dtype of the returned arrays.
      rename: maps a checkpoint key to the canonical key (prefixes, legacy names).
      ignore: regular expressions for checkpoint keys that are known non-parameters (buffers).
    """
    entries = key_map(abstract_params)
    by_key = {e.torch_key: (path, e) for path, e in entries.items()}
    ignore_patterns = [re.compile(p) for p in ignore]
    flat = {}
    unexpected = []
    for key, array in state_dict.items():
        canonical = rename(key) if rename else key
        if canonical not in by_key:
            if not any(p.fullmatch(key) or p.fullmatch(canonical) for p in ignore_patterns):
                unexpected.append(key)
            continue
        path, entry = by_key[canonical]
        if path in flat:
            raise WeightsError(f"{source}: tensor {key!r} duplicates {entry.torch_key!r}; keep one of them")
        array = np.asarray(array)
        squeezable = entry.layout == "linear" and array.ndim == 4 and array.shape[2:] == (1, 1)
        got = array.shape[:2] if squeezable else array.shape
        if tuple(got) != entry.torch_shape:
            raise WeightsError(
                f"{source}: tensor {key!r} has shape {tuple(array.shape)} but the model expects "
                f"{entry.torch_shape}; the config.json does not match these weights")
        flat[path] = _to_flax(array, entry).astype(dtype)
    if unexpected:
        raise WeightsError(
            f"{source}: {len(unexpected)} tensor(s) the model has no place for, e.g. {sorted(unexpected)[0]!r}; "
            "the config.json does not describe these weights")
    missing = [e.torch_key for path, e in entries.items() if path not in flat]
    if missing:
        raise WeightsError(
            f"{source}: {len(missing)} parameter(s) missing from the checkpoint, e.g. {sorted(missing)[0]!r}; "
            "the weights are incomplete or the config.json describes a different model")
    return _unflatten(flat)


def state_dict_from_params(params: Mapping, *, dtype=None) -> dict[str, np.ndarray]:
    """The inverse of :func:`params_from_state_dict`: PyTorch key → array in PyTorch layout."""
    out = {}
    for path, leaf in _flatten(params).items():
        entry = _entry(path, tuple(leaf.shape))
        array = _to_torch(np.asarray(leaf), entry)
        out[entry.torch_key] = np.ascontiguousarray(array if dtype is None else array.astype(dtype))
    return out


# ---------------------------------------------------------------------------------------------------
# Files


def _refuse_pickles(folder: str, weights_name: str) -> None:
    stem = os.path.splitext(weights_name)[0]
    for name in sorted(os.listdir(folder)):
        if name.startswith(("pytorch_model", stem)) and name.endswith(_PICKLE_SUFFIXES):
            raise WeightsError(
                f"{os.path.join(folder, name)}: pickled PyTorch weights are never loaded by mlmjax (unsafe); "
                "convert once in PyTorch: load the folder with diffusers/transformers and call "
                "save_pretrained(folder, safe_serialization=True) to write .safetensors")


def read_safetensors(folder: str, weights_name: str) -> tuple[dict[str, np.ndarray], str]:
    """Reads ``weights_name`` (e.g. ``diffusion_pytorch_model.safetensors``) from ``folder``.

    Accepts a single file, a sharded checkpoint with ``<name>.index.json``, or the ``fp16`` variant
    (``<stem>.fp16.safetensors``) when it is the only copy. Returns the tensors and the path read.
    """
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found; point `pretrained` at a diffusers-layout folder")
    stem = weights_name[: -len(".safetensors")]
    candidates = [weights_name, f"{stem}.fp16.safetensors"]
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return _load_file(path), path
        index = path + ".index.json"
        if os.path.isfile(index):
            return _load_sharded(index), index
    _refuse_pickles(folder, weights_name)
    raise WeightsError(f"{folder}: no {weights_name} (or sharded {weights_name}.index.json) found")


def _load_file(path: str) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(path)
    except Exception as error:  # safetensors raises several types for a damaged file
        raise WeightsError(f"{path}: not a readable safetensors file ({error}); re-export it") from None


def _load_sharded(index_path: str) -> dict[str, np.ndarray]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as error:
        raise WeightsError(f"{index_path}: not a valid shard index ({error})") from None
    folder = os.path.dirname(index_path)
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise WeightsError(f"{index_path}: lists shard {shard!r}, which is missing from {folder}")
        tensors.update(_load_file(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise WeightsError(f"{index_path}: tensor {missing[0]!r} is listed but not in its shard")
    return tensors


def write_safetensors(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes atomically: a crash never leaves a half-written weights file under the final name."""
    with files.atomic_path(path) as temporary:
        safetensors.numpy.save_file(dict(state_dict), temporary, metadata={"format": "pt"})
