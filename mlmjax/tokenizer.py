"""The CLIP BPE tokenizer, offline.

A checkpoint's own ``tokenizer/`` folder wins when present. Otherwise the tokenizer is rebuilt from
the real CLIP BPE merges vendored in ``third_party/clip_bpe`` (MIT, from OpenCLIP): the vocabulary is
the 256 byte symbols, the same with an end-of-word marker, one token per merge, then the two specials,
49,408 entries in all, exactly as OpenAI's CLIP and Stable Diffusion number them.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a tokenizer is made: transformers takes seconds to import
    from transformers import CLIPTokenizer

MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _vendored_bpe_path() -> str:
    """Installed as package data of ``mlmjax._clip_bpe``; a bare source checkout has third_party/."""
    try:
        path = str(importlib.resources.files("mlmjax._clip_bpe") / _BPE_FILE)
    except ModuleNotFoundError:
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(os.path.dirname(here), "third_party", "clip_bpe", _BPE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the vendored CLIP vocabulary {path} is missing; reinstall mlmjax")
    return path


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@functools.lru_cache(maxsize=1)
def _vendored_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(_vendored_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def vendored_tokenizer() -> CLIPTokenizer:
    """SD 1.x's tokenizer (pad = end-of-text), built from the vendored vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = _vendored_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)


def load_tokenizer(folder: str | None = None) -> CLIPTokenizer:
    """The tokenizer saved in ``folder`` if it holds one, else the vendored CLIP tokenizer."""
    if folder and any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder)
    return vendored_tokenizer()


def add_concept_tokens(tokenizer: CLIPTokenizer, tokens: list[str]) -> list[int]:
    """Adds new tokens (e.g. ``<dog6>``) and returns their ids; refuses a token already known.

    A placeholder that the vocabulary already has (as a token or as a whole word) would silently
    share its embedding with an existing word, so it is an error.
    """
    vocab = tokenizer.get_vocab()
    for token in tokens:
        # CLIP lower-cases words and marks word ends with </w>: "Dog" would be the existing "dog</w>".
        if {token, token.lower(), token.lower() + "</w>"} & vocab.keys():
            raise ValueError(f"concept token {token!r} is already in the tokenizer's vocabulary; "
                             "choose a new one such as '<my-concept>'")
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise ValueError(f"could not add all of {tokens} to the tokenizer (duplicates?)")
    return tokenizer.convert_tokens_to_ids(tokens)


# A transformers tokenizer sets its padding and truncation state on every call, so two threads
# tokenizing at once (the batch pipeline prefetches in threads) can corrupt each other's output.
_TOKENIZE_LOCK = threading.Lock()


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]):
    """Token ids ``[len(prompts), 77]``, padded and truncated as Stable Diffusion does; thread-safe."""
    with _TOKENIZE_LOCK:
        return tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                         return_tensors="np").input_ids
