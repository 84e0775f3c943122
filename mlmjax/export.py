r"""Export a customized run to the files PyTorch diffusers loads.

    python -m mlmjax.export --workdir /tmp/ti --out /tmp/ti-export
    python -m mlmjax.export --workdir /tmp/db --out /tmp/db-export --step 500 --overwrite

What ``--out`` receives depends on the run's ``config.method``; only what the method trained is
written, as float32 safetensors, plus ``README.md`` (how to load it, with the run's own names) and
``export.json`` (method, step, base model, tokens, files)::

    ti                learned_embeds.safetensors        {"<token>": [1, D]}
    xti               learned_embeds_<k>.safetensors    {"<token>": [1, D]}, {"<token>_1": [1, D]}, ...
    dreambooth        a StableDiffusionPipeline folder  (model_index.json, unet/, text_encoder/, tokenizer/, ...)
    custom_diffusion  pytorch_custom_diffusion_weights.safetensors, learned_embeds.safetensors
                      [+ text_encoder/, tokenizer/ when the run trained the text encoder]

* **TI.** The embedding file is what diffusers' textual-inversion example writes (one key, the token,
  a ``[1, D]`` tensor): ``pipe.load_textual_inversion(OUT)`` on the base model adds the token.
* **XTI/P+.** One such file per token: token k (``<token>``, then ``<token>_1`` ...) conditions the
  cross-attention layers that ``export.json`` lists for it (its ``layers``, diffusers module names
  such as ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``, in the order of
  :mod:`mlmjax.models.unet`: down blocks, mid block, up blocks). diffusers has no per-layer text
  conditioning, so the prompt is encoded once per token and each ``attn2`` is fed its token's
  features. Note that diffusers' pipelines read ``<token>`` next to ``<token>_1`` as one
  multi-vector token and expand the prompt to ``<token> <token>_1 ...``: encode with
  ``pipe.tokenizer``/``pipe.text_encoder`` directly.
* **DreamBooth.** A full pipeline: the trained UNet and text encoder, the concept tokens appended to the
  token-embedding table (``vocab_size`` grows by their number, ids ``vocab_size ..``) and the
  tokenizer with the tokens added. ``StableDiffusionPipeline.from_pretrained(OUT)`` loads it.
* **Custom Diffusion.** diffusers' Custom Diffusion attention processors
  (``<attn2>.processor.to_{k,v}_custom_diffusion.weight``, and ``to_q``/``to_out`` when trained) and
  the token embedding. Every other attention layer gets an empty (zero-size) entry: diffusers installs
  the processors as one dict that must name every attention layer, the entries its pickle format
  writes as ``{}``. Load with ``pipe.unet.load_attn_procs(OUT, weight_name=..., _pipeline=pipe)``:
  up to at least diffusers 0.42 the call installs nothing without ``_pipeline`` (diffusers issue
  #9320). When the run trained the text encoder (the authors' default), ``text_encoder/`` (with the
  concept rows) and ``tokenizer/`` replace the base model's, instead of ``load_textual_inversion``.

The folder is assembled next to ``--out`` and renamed into place at the end, so an interrupted export
leaves nothing half-written; a non-empty ``--out`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Mapping, NoReturn

import jax
import numpy as np

from mlmjax import pretrained as pretrained_lib
from mlmjax import runtime
from mlmjax import weights
from mlmjax import workdir as workdir_lib
from mlmjax.models import clip_text
from mlmjax.models import unet as unet_lib
from mlmjax.workdir import TrainedRun

README_FILE = "README.md"
MANIFEST_FILE = "export.json"
EMBEDDING_FILE = "learned_embeds.safetensors"  # the name diffusers' load_textual_inversion(folder) reads
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"

# Trained parameters each format can hold (regexes over "/"-joined parameter paths). DreamBooth writes
# whole networks, so anything goes; a config that trains more than its format holds is refused rather
# than exported without it.
_CONCEPT = r"concept/.*"
_EXPORTABLE = {
    "ti": (_CONCEPT,),
    "xti": (_CONCEPT,),
    "dreambooth": (r".*",),
    "custom_diffusion": (_CONCEPT, r"text_encoder/.*", r"unet/.+/attn2/(to_q|to_k|to_v|to_out_0)/(kernel|bias)"),
}
_KV, _QO = ("to_k", "to_v"), ("to_q", "to_out_0")
# A cross-attention projection's state-dict key → its name in a Custom Diffusion processor.
_PROCESSOR_KEY = re.compile(r"(?P<layer>.+\.attn2)\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.(?P<leaf>weight|bias)")
_PROCESSOR_NAMES = {"to_q": "to_q_custom_diffusion", "to_k": "to_k_custom_diffusion",
                    "to_v": "to_v_custom_diffusion", "to_out.0": "to_out_custom_diffusion.0"}


@dataclasses.dataclass
class _Export:
    """What a method's writer produced: ``export.json`` entries and the README's loading instructions."""
    manifest: dict
    usage: str


# ---------------------------------------------------------------------------------------------------
# Pieces shared by the formats


def cross_attention_layer_names(config: unet_lib.UNetConfig) -> list[str]:
    """diffusers module names of the UNet's ``attn2`` layers, in the order of per-layer contexts.

    That order (down blocks, mid block, up blocks; attentions, then transformer blocks within each) is
    the one documented in :mod:`mlmjax.models.unet`, so entry n feeds on ``context[n]`` there.
    """
    depth = range(config.transformer_layers_per_block)

    def block(prefix: str, attentions: int) -> list[str]:
        return [f"{prefix}.attentions.{a}.transformer_blocks.{t}.attn2" for a in range(attentions) for t in depth]

    names = []
    for i, kind in enumerate(config.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            names += block(f"down_blocks.{i}", config.layers_per_block)
    names += block("mid_block", 1)
    for i, kind in enumerate(config.up_block_types):
        if kind == "CrossAttnUpBlock2D":
            names += block(f"up_blocks.{i}", config.layers_per_block + 1)
    if len(names) != unet_lib.num_cross_attention_layers(config):
        raise AssertionError(f"{len(names)} attn2 names for {unet_lib.num_cross_attention_layers(config)} layers")
    return names


def _leaf_paths(tree: Mapping) -> list[str]:
    return ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _check_exportable(run: TrainedRun) -> None:
    """Refuses a run whose config trained a parameter that its method's format cannot hold."""
    method = run.config.method
    if method not in _EXPORTABLE:
        raise ValueError(f"{run.workdir}: config.method={method!r} has no export; "
                         f"exportable methods: {', '.join(_EXPORTABLE)}")
    allowed = [re.compile(pattern) for pattern in _EXPORTABLE[method]]
    for path in _leaf_paths(run.trained):
        if not any(regex.fullmatch(path) for regex in allowed):
            raise ValueError(f"{run.workdir}: the run trained {path}, which the {method} export format cannot "
                             f"hold; train with configs/{method}.py's trainable rules to export it")


def _concept_embeddings(run: TrainedRun) -> np.ndarray:
    """``[C, D]`` float32, after checking that token k has id ``vocab_size + k`` in the run's tokenizer.

    Those ids are where the rows go in an extended embedding table, and the ids the run trained with.
    """
    embeddings = np.asarray(run.params["concept"]["embeddings"], np.float32)
    vocab = run.model.text_encoder.config.vocab_size
    ids = run.model.tokenizer.convert_tokens_to_ids(run.concept_tokens)
    if len(run.concept_tokens) != embeddings.shape[0] or ids != list(range(vocab, vocab + embeddings.shape[0])):
        raise ValueError(f"{run.workdir}: concept tokens {run.concept_tokens} have ids {ids} in the run's tokenizer; "
                         f"expected {embeddings.shape[0]} tokens with ids from {vocab} (the run's model is not "
                         "the one it was trained from)")
    return embeddings


def _write_embedding(folder: str, name: str, token: str, vector: np.ndarray) -> str:
    """One textual-inversion file: ``{token: [1, D]}``, as diffusers' example writes it."""
    weights.write_safetensors(os.path.join(folder, name), {token: np.ascontiguousarray(vector[None])})
    return name


def text_encoder_with_concepts(run: TrainedRun) -> tuple[clip_text.CLIPTextModel, dict]:
    """The run's text encoder with the concept rows appended to its token-embedding table.

    Returns the module (its config's ``vocab_size`` grown by the number of concept tokens) and its
    parameters: what transformers' ``CLIPTextModel`` holds after ``resize_token_embeddings`` and
    the tokens' rows set, so the run's tokenizer (which has the tokens) drives it unchanged.
    """
    rows = _concept_embeddings(run)
    params = jax.tree.map(np.asarray, run.params["text_encoder"])
    table = params["embeddings"]["token_embedding"]["embedding"]
    params["embeddings"]["token_embedding"]["embedding"] = np.concatenate([table, rows.astype(table.dtype)])
    module = run.model.text_encoder
    config = dataclasses.replace(module.config, vocab_size=table.shape[0] + rows.shape[0])
    return module.clone(config=config), params


def custom_diffusion_weights(run: TrainedRun) -> dict[str, np.ndarray]:
    """diffusers' Custom Diffusion processor state dict for the run's trained cross-attention layers.

    A layer whose K or V trained gets both (the processor replaces the pair); one whose Q or output
    projection trained also gets both of those (diffusers then sets ``train_q_out``). Untrained
    companions take the base model's values, so the processor computes exactly the run's layer.
    Every other attention layer of the UNet gets a zero-size entry (see the module docstring).
    Empty when no cross-attention layer trained.
    """
    trained: dict[str, set[str]] = {}
    for path in _leaf_paths(run.trained.get("unet", {})):
        layer, projection, _ = path.rsplit("/", 2)
        trained.setdefault(layer, set()).add(projection)
    subtree: dict = {}
    for layer, projections in trained.items():
        keep = _KV + (_QO if projections & set(_QO) else ())
        source, target = run.params["unet"], subtree
        for key in layer.split("/"):
            source, target = source[key], target.setdefault(key, {})
        target.update({name: source[name] for name in keep})
    out = {}
    for key, value in weights.state_dict_from_params(subtree, dtype=np.float32).items():
        match = _PROCESSOR_KEY.fullmatch(key)
        if match is None or (match["proj"] != "to_out.0" and match["leaf"] == "bias"):
            raise ValueError(f"{run.workdir}: unet parameter {key} has no place in a Custom Diffusion processor "
                             "(to_q/to_k/to_v without bias, to_out.0); it cannot be exported")
        out[f"{match['layer']}.processor.{_PROCESSOR_NAMES[match['proj']]}.{match['leaf']}"] = value
    if not out:
        return out
    cross = cross_attention_layer_names(run.model.unet.config)
    for layer in cross + [name.removesuffix("attn2") + "attn1" for name in cross]:
        if not any(key.startswith(f"{layer}.processor.") for key in out):
            out[f"{layer}.processor"] = np.zeros((0,), np.float32)
    return out


def _base(run: TrainedRun) -> str:
    return run.config.pretrained or "<the base model folder>"


# ---------------------------------------------------------------------------------------------------
# One writer per method: (run, folder) -> _Export


def _write_ti(run: TrainedRun, folder: str) -> _Export:
    token = run.concept_tokens[0]
    name = _write_embedding(folder, EMBEDDING_FILE, token, _concept_embeddings(run)[0])
    usage = f"""Textual Inversion: the embedding of `{token}` in diffusers' format.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{_base(run)}")
pipe.load_textual_inversion("OUT")  # reads OUT/{name}
image = pipe("a photo of a {run.concept_phrase} on the beach").images[0]
```
"""
    return _Export({"files": {token: name}}, usage)


def _write_xti(run: TrainedRun, folder: str) -> _Export:
    embeddings = _concept_embeddings(run)
    names = cross_attention_layer_names(run.model.unet.config)
    layer_tokens = run.spec.layer_tokens
    if layer_tokens is None or len(layer_tokens) != len(names):
        raise ValueError(f"{run.workdir}: an XTI run needs one concept token per cross-attention layer "
                         f"({len(names)}), got layer_tokens={layer_tokens}")
    tokens = []
    for k, token in enumerate(run.concept_tokens):
        file = _write_embedding(folder, f"learned_embeds_{k}.safetensors", token, embeddings[k])
        tokens.append({"token": token, "file": file,
                       "layers": [name for name, t in zip(names, layer_tokens) if t == k]})
    first = run.concept_tokens[0]
    table = "".join(f"| `{t['token']}` | `{t['file']}` | {', '.join(f'`{n}`' for n in t['layers'])} |\n"
                    for t in tokens)
    usage = f"""XTI/P+: {len(tokens)} token embeddings, one per group of UNet cross-attention layers.
Token k conditions only the `attn2` layers listed for it in `{MANIFEST_FILE}` (`tokens[k].layers`;
`layers` gives the token of every layer, in execution order):

| token | file | cross-attention layers |
|---|---|---|
{table}
diffusers has no per-layer text conditioning: encode the prompt once per token and feed each `attn2`
its token's features, e.g. with forward pre-hooks. Encode with the tokenizer and text encoder directly:
diffusers' pipelines would expand `{first}` into the multi-vector `{first} {first}_1 ...`.

```python
import json
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{_base(run)}")
export = json.load(open("OUT/{MANIFEST_FILE}"))
pipe.load_textual_inversion([f"OUT/{{t['file']}}" for t in export["tokens"]])
prompt = "a photo of a {run.concept_phrase} on the beach"
for t in export["tokens"]:
    ids = pipe.tokenizer(prompt.replace("{first}", t["token"]), padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    context = pipe.text_encoder(ids)[0].detach()
    for layer in t["layers"]:
        pipe.unet.get_submodule(layer).register_forward_pre_hook(
            lambda module, args, kwargs, c=context: (args, {{**kwargs, "encoder_hidden_states": c}}),
            with_kwargs=True)
noise_pred = pipe.unet(latents, timestep, encoder_hidden_states=context).sample  # hooks swap contexts
```
"""
    manifest = {"tokens": tokens, "layers": [[name, run.concept_tokens[t]] for name, t in zip(names, layer_tokens)]}
    return _Export(manifest, usage)


def _write_dreambooth(run: TrainedRun, folder: str) -> _Export:
    module, text_params = text_encoder_with_concepts(run)
    params = {"text_encoder": text_params, "unet": run.params["unet"], "vae": run.model.params["vae"]}
    pretrained_lib.save_pretrained(folder, dataclasses.replace(run.model, text_encoder=module), params,
                                   overwrite=True)  # folder: the export's own, empty staging folder
    tokens = ", ".join(f"`{t}`" for t in run.concept_tokens)
    usage = f"""DreamBooth: a complete Stable Diffusion pipeline with the trained UNet and text encoder. The
tokenizer knows {tokens}; the text encoder's token-embedding table ends with its row (`vocab_size`
{module.config.vocab_size}).

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("OUT")
image = pipe("a photo of a {run.concept_phrase} on the beach").images[0]
```
"""
    return _Export({"files": {"pipeline": "."}}, usage)


def _write_custom_diffusion(run: TrainedRun, folder: str) -> _Export:
    token = run.concept_tokens[0]
    files = {token: _write_embedding(folder, EMBEDDING_FILE, token, _concept_embeddings(run)[0])}
    processors = custom_diffusion_weights(run)
    if processors:
        weights.write_safetensors(os.path.join(folder, CUSTOM_DIFFUSION_FILE), processors)
        files["unet_attention_processors"] = CUSTOM_DIFFUSION_FILE
    text_encoder_trained = "text_encoder" in run.trained
    if text_encoder_trained:
        module, text_params = text_encoder_with_concepts(run)
        pretrained_lib.save_component(os.path.join(folder, "text_encoder"), "text_encoder", module, text_params)
        run.model.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        files.update(text_encoder="text_encoder", tokenizer="tokenizer")
        text_side = f"""from transformers import CLIPTextModel, CLIPTokenizer
# The run trained the text encoder: use it and its tokenizer (which knows `{token}`) instead of the
# base model's; {EMBEDDING_FILE} holds the same token row, for reference.
pipe = StableDiffusionPipeline.from_pretrained(
    "{_base(run)}", text_encoder=CLIPTextModel.from_pretrained("OUT/text_encoder"),
    tokenizer=CLIPTokenizer.from_pretrained("OUT/tokenizer"))"""
    else:
        text_side = f"""pipe = StableDiffusionPipeline.from_pretrained("{_base(run)}")
pipe.load_textual_inversion("OUT")  # reads OUT/{EMBEDDING_FILE}"""
    unet_side = "" if not processors else f"""
# _pipeline=pipe: without it diffusers (<= 0.42 at least) installs nothing (diffusers issue #9320).
pipe.unet.load_attn_procs("OUT", weight_name="{CUSTOM_DIFFUSION_FILE}", _pipeline=pipe)"""
    usage = f"""Custom Diffusion: the trained cross-attention projections as diffusers' Custom Diffusion attention
processors, and the `{token}` embedding{' with the trained text encoder' if text_encoder_trained else ''}.

```python
from diffusers import StableDiffusionPipeline
{text_side}{unet_side}
image = pipe("a photo of a {run.concept_phrase} on the beach").images[0]
```
"""
    return _Export({"files": files, "text_encoder_trained": text_encoder_trained}, usage)


_WRITERS: dict[str, Callable[[TrainedRun, str], _Export]] = {
    "ti": _write_ti, "xti": _write_xti, "dreambooth": _write_dreambooth, "custom_diffusion": _write_custom_diffusion,
}


# ---------------------------------------------------------------------------------------------------
# The export


def check_out(out: str, *, overwrite: bool = False, keep: tuple[str, ...] = ()) -> str:
    """``out`` as an absolute path, after refusing what an export must not write to.

    A file, a non-empty folder without ``overwrite``, or a folder holding one of ``keep`` (the run's
    workdir, its base model: replacing ``out`` would delete them) is an error.
    """
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out}: is a file; choose a new folder for the export")
    real_out = os.path.realpath(out)
    for path in keep:
        real = os.path.realpath(os.path.expanduser(path))
        if real == real_out or real.startswith(real_out.rstrip(os.sep) + os.sep):
            raise ValueError(f"{out}: holds {path}, which the export must not replace; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder or pass --overwrite")
    return out


def _publish(staging: str, out: str) -> None:
    """Moves the finished ``staging`` folder to ``out``, replacing what was there."""
    if not os.path.exists(out):
        os.replace(staging, out)
        return
    old = tempfile.mkdtemp(prefix=".mlmjax-export-old-", dir=os.path.dirname(out))
    os.replace(out, os.path.join(old, "out"))  # renames: the old export is gone only once the new one is in
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def export(run: TrainedRun, out: str, *, overwrite: bool = False) -> list[str]:
    """Writes what diffusers needs to use ``run``'s concept into the folder ``out`` (see the module docstring).

    ``out`` must be new or empty unless ``overwrite``. Returns the paths of the files written, sorted.
    """
    _check_exportable(run)
    keep = tuple(p for p in (run.workdir, run.config.pretrained) if p)
    out = check_out(out, overwrite=overwrite, keep=keep)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix=".mlmjax-export-", dir=parent)
    try:
        staging = os.path.join(root, "out")
        os.makedirs(staging)  # not mkdtemp's folder itself: that one is private (0700)
        mode = os.stat(staging).st_mode
        written = _WRITERS[run.config.method](run, staging)
        os.chmod(staging, mode)  # save_pretrained moves its own (0700) staging folder here
        manifest = {"method": run.config.method, "workdir": os.path.abspath(run.workdir), "step": run.step,
                    "base_model": run.config.pretrained, "concept_tokens": list(run.concept_tokens),
                    "concept_phrase": run.concept_phrase, **written.manifest}
        with open(os.path.join(staging, MANIFEST_FILE), "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
        with open(os.path.join(staging, README_FILE), "w") as f:
            f.write(f"# {run.concept_phrase}: mlmjax {run.config.method} export\n\n"
                    f"From `{os.path.abspath(run.workdir)}`, step {run.step}; base model `{_base(run)}`. "
                    f"Replace `OUT` with this folder's path.\n\n{written.usage}")
        _publish(staging, out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(out) for name in names)


# ---------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        runtime.fail(message)


def main(argv: list[str] | None = None) -> None:
    """``python -m mlmjax.export``: prints the path of each file written, one a line."""
    parser = _Parser(prog="python -m mlmjax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training run's workdir")
    parser.add_argument("--out", required=True, help="the export folder (new or empty, unless --overwrite)")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        check_out(args.out, overwrite=args.overwrite, keep=(args.workdir,))  # before the slow model load
        run = workdir_lib.load_trained(args.workdir, step=args.step)
        paths = export(run, args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as error:
        runtime.fail(str(error))
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
