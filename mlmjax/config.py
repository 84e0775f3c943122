"""The configuration every method shares, and its validation.

``configs/<method>.py`` files start from :func:`base_config` and set what their method changes, so the
four baselines differ only in configuration (PAPER.md §3). Fields are locked: an override of a key
that does not exist is an error, as is a value of the wrong type.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Sequence

import ml_collections

from mlmjax.prompts.prompt_set import ALL_FAMILIES

# The embedded default's concept photos (``mlmjax.tiny.embedded_assets().concept_images``), named here
# so that reading a config needs no model code.
EMBEDDED_CONCEPT_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny", "concept")
# The repository's configs/ folder: files of the repository, not of the package.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

METHODS = ("ti", "xti", "dreambooth", "custom_diffusion")

# PAPER.md §1.4: the text side only. Regexes over "<component>/<flax path>"; first match wins.
TEXT_ENCODER = r"text_encoder/.*"
CONCEPT = r"concept/.*"
UNET_CROSS_ATTENTION_KV = r"unet/.*/attn2/to_[kv]/.*"
UNET_CROSS_ATTENTION_QO = r"unet/.*/attn2/to_(q|out_0)/.*"
UNET = r"unet/.*"


def base_config() -> ml_collections.ConfigDict:
    """Defaults common to the four baselines (PAPER.md §3), method-independent parts of the run."""
    c = ml_collections.ConfigDict()
    c.method = "ti"
    c.pretrained = ""  # a diffusers-layout folder; empty: the embedded tiny default
    c.resolution = 0  # pixels; 0: the pretrained VAE's sample_size (512 for SD 1.5, 32 for the tiny default)
    c.seed = 7777
    c.max_steps = 3001
    c.batch_size = 4
    c.learning_rate = 2e-3  # the effective rate (already scaled as the authors' `scale_lr` did)
    # "bfloat16": the networks compute in bf16 (matmuls, convolutions, activations) while parameters,
    # gradients, optimizer state, normalisation statistics, softmaxes and losses stay float32.
    c.compute_dtype = "float32"
    # Recompute each UNet down/mid/up block's activations in the backward pass instead of keeping
    # them: less accelerator memory for ~1/3 more UNet compute; the same results up to float rounding.
    c.remat = False

    c.concept = ml_collections.ConfigDict()
    c.concept.images = ""  # a folder of photos; empty: the embedded default's concept
    c.concept.token = "<concept>"
    c.concept.class_noun = ""  # empty: the embedded default's
    # Which context-rich prompt set: "pet", "nonliving" or "world"; empty: "world" for the embedded
    # default's concept (concept.images empty), else "nonliving" (see concept_family).
    c.concept.family = ""
    c.concept.init_word = ""  # the word whose embedding starts the concept token; empty: class noun
    c.concept.xti_tokens = "blocks"  # XTI/P+ only: one token per cross-attention "blocks" group (7) or "layers" (16)
    c.concept.flip_prob = 0.5

    c.prior = ml_collections.ConfigDict()
    c.prior.weight = 0.0  # 0: no prior preservation
    c.prior.images = ""  # a folder of class images; empty: generated into the workdir
    c.prior.prompt = "a picture of a {}"
    c.prior.num_images = 100

    c.mlm = ml_collections.ConfigDict()
    c.mlm.weight = 0.0  # λ; 0 gives exactly the plain baseline and skips the MLM branch entirely
    c.mlm.mask_prob = 0.15
    c.mlm.batch_size = 25
    c.mlm.contextualizer = ""  # a folder written by mlmjax's pretraining or converter; empty: embedded
    # Quirk (PAPER.md §1.4): the authors' XTI MLM prompts carry the concept token without the class noun.
    c.mlm.class_noun_in_prompts = True
    c.mlm.prompt_types = ""  # comma-separated subset of the family's caption types; empty: all
    c.mlm.per_type_size = 0  # ablation: keep only N prompts per type (drawn with replacement); 0: all

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-2
    c.optimizer.grad_clip = 0.0  # global-norm clip; 0: none

    # ("regex", "train"|"freeze") over "<component>/<flax path>"; the method config fills it.
    c.trainable = [(CONCEPT, "train"), (r".*", "freeze")]

    # Devices: (data, fsdp, tensor) sizes, one -1 fills (see mlmjax/sharding.py). All data-parallel by default.
    # cpu_devices: on a CPU, split it into this many JAX devices for the mesh (0: one), which runs a
    # small model's data-parallel shares side by side on the cores (README, "Devices and sharding").
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "cpu_devices": 0})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500  # steps between checkpoints (async); one is always saved at the end. 0: only at the end
    c.checkpoint.keep = 3  # the newest K checkpoints are kept

    c.log_every = 50
    c.sample_steps = 25  # DDIM steps for the samples written at the end of a run
    # A tuple, so the command line can set it: --config.sample_prompts="('a {} in the snow',)"; () for none.
    c.sample_prompts = ("a photo of a {} on the beach", "a {} wearing a red hat", "a {} in the snow")
    return c


def load_method_config(method: str, overrides: Sequence[tuple[str, str]] = (),
                       configs_dir: str = CONFIGS_DIR) -> ml_collections.ConfigDict:
    """``configs/<method>.py`` with `overrides`, as :func:`load_config_file` reads them."""
    path = os.path.join(configs_dir, f"{method}.py")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such config; give a method of configs/ (a folder of the repository, "
                         "not of the installed package)")
    return load_config_file(path, overrides)


def load_config_file(config_file: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """The config ``mlmjax.train --config=FILE --config.KEY=VALUE ...`` runs.

    `config_file` may carry options (``configs/x.py:a,b``). Overrides are ``(dotted key, text)`` pairs,
    applied in order (a later one for the same key wins), each parsed by ml_collections' own flag
    parser: the same types and the same errors as on mlmjax.train's command line. A config of one of
    :data:`METHODS` is then checked by :func:`validate`. Every problem is a one-line ValueError naming
    the file, the key and the value.
    """
    from absl import flags
    from ml_collections import config_flags

    if not os.path.isfile(config_file.partition(":")[0]):
        raise ValueError(f"{config_file}: config file not found")
    _check_keys(config_file, [key for key, _ in overrides])
    flag_values = flags.FlagValues()
    argv = ["mlmjax", f"--config={config_file}", *[f"--config.{key}={value}" for key, value in overrides]]
    # config_flags defines the override flags from the argv it is given (sys.argv by default).
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    try:
        flag_values(argv)
        config = flag_values.config
        if config.get("method") in METHODS:
            validate(config)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as error:
        message = str(error.args[0] if error.args else error).replace("\\n", " ").replace("\\'", "'")
        if isinstance(error, (KeyError, AttributeError)):  # ml_collections' text is a quoted KeyError repr
            message = message.replace("'", "")
        described = ", ".join(f"{key}={value}" for key, value in overrides)
        raise ValueError(f"{config_file} with {described or 'no overrides'}: {' '.join(message.split())}") from None
    return config


_KEYS: dict[str, set[str]] = {}  # each config file's dotted keys, read once


def _check_keys(config_file: str, keys: Sequence[str]) -> None:
    """Every override names a field of the config file (a one-line error with a suggestion otherwise)."""
    if not keys:
        return
    if config_file not in _KEYS:
        _KEYS[config_file] = set(flatten_config(load_config_file(config_file).to_dict()))
    for key in keys:
        if key not in _KEYS[config_file]:
            close = difflib.get_close_matches(key, sorted(_KEYS[config_file]), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"{key}: {config_file} has no such config key{hint}")


def flatten_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A config as JSON (nested dicts) keyed by dotted field names, ``{"mlm.weight": 1e-5, ...}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Rejects values that cannot run, with the key named; called before anything is written."""
    def fail(key: str, message: str):
        raise ValueError(f"config.{key}={config_value(config, key)!r}: {message}")

    if config.method not in METHODS:
        fail("method", f"must be one of {METHODS}")
    for key in ("max_steps", "batch_size", "mlm.batch_size", "log_every", "checkpoint.keep"):
        if config_value(config, key) <= 0:
            fail(key, "must be a positive integer")
    for key in ("checkpoint.every", "learning_rate", "mlm.weight", "prior.weight", "optimizer.weight_decay", "optimizer.grad_clip"):
        if config_value(config, key) < 0:
            fail(key, "must be non-negative")
    if not 0 < config.mlm.mask_prob < 1:
        fail("mlm.mask_prob", "must be in (0, 1)")
    if config.concept.family not in ("",) + ALL_FAMILIES:
        fail("concept.family", f"must be one of {('',) + ALL_FAMILIES}")
    if config.concept.xti_tokens not in ("blocks", "layers"):
        fail("concept.xti_tokens", "must be 'blocks' or 'layers'")
    if config.compute_dtype not in ("float32", "bfloat16"):
        fail("compute_dtype", "must be 'float32' or 'bfloat16'")
    if "{}" not in config.prior.prompt:
        fail("prior.prompt", "needs a {} slot for the class noun")
    for i, prompt in enumerate(config.sample_prompts):
        if "{}" not in prompt:
            fail("sample_prompts", f"prompt {i} ({prompt!r}) needs a {{}} slot for the concept")


def concept_family(config: ml_collections.ConfigDict) -> str:
    """The concept's prompt family; an empty ``concept.family`` means "world" for the embedded default's
    concept (``concept.images`` empty or the embedded photos' folder: the world's teapot) and
    "nonliving" for a user's photos, the default before "world" existed, so a user's config keeps its
    prompt set."""
    if config.concept.family:
        return config.concept.family
    images = config.concept.images
    embedded = not images or os.path.realpath(os.path.expanduser(images)) == os.path.realpath(EMBEDDED_CONCEPT_IMAGES)
    return "world" if embedded else "nonliving"


def parse_options(options: str | None, allowed: tuple[str, ...]) -> set[str]:
    """The comma-separated options after a config file name (``configs/x.py:a,b``), checked."""
    chosen = {o.strip() for o in (options or "").split(",") if o.strip()}
    unknown = chosen - set(allowed)
    if unknown:
        raise ValueError(f"unknown config option(s) {sorted(unknown)}; this config accepts {list(allowed)}")
    return chosen


def config_value(config: ml_collections.ConfigDict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value
