"""Which parameters train: regex rules from the config turned into a split of the parameter tree.

Rules are ``(regex, "train" | "freeze")`` pairs matched against ``/``-joined parameter paths such as
``unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel``; the first rule whose regex
matches the whole path decides (big_vision's idea). A parameter that no rule matches is an error, so a
config can never leave a tensor's fate to chance. Frozen leaves are kept out of the optimizer
altogether: they get no optimizer state and no weight decay, and they reach the jitted step as
arguments rather than constants.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax

TRAIN, FREEZE = "train", "freeze"


def _path_string(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def labels(params: Mapping, rules: Sequence[tuple[str, str]]) -> dict:
    """A tree like ``params`` with ``"train"`` or ``"freeze"`` at every leaf."""
    compiled = []
    for pattern, label in rules:
        if label not in (TRAIN, FREEZE):
            raise ValueError(f"trainable rule {pattern!r}: label {label!r} must be {TRAIN!r} or {FREEZE!r}")
        compiled.append((re.compile(pattern), label))

    def label_of(path, _):
        name = _path_string(path)
        for regex, label in compiled:
            if regex.fullmatch(name):
                return label
        raise ValueError(f"parameter {name} matches no trainable rule; add a rule for it (e.g. ('.*', 'freeze'))")

    return jax.tree_util.tree_map_with_path(label_of, params)


def _select(params: Mapping, label_tree: Mapping, keep: str) -> dict:
    out = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            sub = _select(value, label_tree[name], keep)
            if sub:
                out[name] = sub
        elif label_tree[name] == keep:
            out[name] = value
    return out


def split(params: Mapping, label_tree: Mapping) -> tuple[dict, dict]:
    """``(trainable, frozen)``: two disjoint nested dicts that together hold every leaf once."""
    return _select(params, label_tree, TRAIN), _select(params, label_tree, FREEZE)


def merge(trainable: Mapping, frozen: Mapping) -> dict:
    """The inverse of :func:`split`."""
    out = dict(frozen)
    for name, value in trainable.items():
        if name in out and isinstance(value, Mapping):
            out[name] = merge(value, out[name])
        elif name in out:
            raise ValueError(f"parameter {name} is both trainable and frozen")
        else:
            out[name] = value
    return out


def count(tree) -> int:
    """Number of scalars in a parameter tree."""
    return sum(x.size for x in jax.tree.leaves(tree))
