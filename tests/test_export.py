"""Exports of each method, loaded in PyTorch diffusers as the export's README says, against mlmjax's own
text features and UNet prediction on the same prompt (float32, tiny model)."""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers

from helpers import relative_error
from mlmjax import checkpoint as checkpoint_lib
from mlmjax import export as export_lib
from mlmjax import method as method_lib
from mlmjax import pretrained as pretrained_lib
from mlmjax import tiny, trainable
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import train_step as train_step_lib
from mlmjax import workdir as workdir_lib
from test_train_step import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of a <teapot1> teapot on the beach"  # load_config's token and class noun
TEXT_TOLERANCE, UNET_TOLERANCE = 1e-5, 1e-4


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """The base model as a diffusers folder (its tokenizer without concept tokens)."""
    folder = str(tmp_path_factory.mktemp("base") / "model")
    pretrained_lib.save_pretrained(folder, tiny.tiny_pretrained())
    return folder


def _perturbed(tree, seed: int):
    """Every leaf moved by 30% of its RMS (biases, at 0, by 0.3), so that a stale value cannot pass."""
    rng = np.random.default_rng(seed)

    def move(leaf):
        leaf = np.asarray(leaf, np.float32)
        scale = float(np.sqrt(np.mean(leaf ** 2))) or 1.0
        return leaf + np.float32(0.3 * scale) * rng.standard_normal(leaf.shape, np.float32)

    return jax.tree.map(move, tree)


def _run(name: str, options: str | None, base: str, workdir: str) -> tuple[workdir_lib.TrainedRun, dict]:
    """A run as ``load_trained`` returns it, every trainable leaf randomly "trained"; and the untrained params."""
    config = load_config(name, options)
    config.mlm.weight = 0.0
    config.pretrained = base
    model = tiny.tiny_pretrained()  # the weights saved in `base`
    built = method_lib.build_state(config, model, contextualizer_folder=None)
    trained = _perturbed(built.state.params, seed=len(name) + len(options or ""))
    run = workdir_lib.TrainedRun(
        workdir=workdir, step=11, config=config, model=model, spec=built.state.spec,
        params=trainable.merge(trained, built.state.frozen), trained=trained, concept_tokens=built.concept_tokens,
        concept_phrase=built.concept_phrase)
    return run, trainable.merge(built.state.params, built.state.frozen)


def _inputs(tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    latents = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype(np.float32)
    return tokenizer_lib.tokenize(tokenizer, [PROMPT]).astype(np.int32), latents, np.array([500])


def _forward(spec, params, ids, latents, timesteps):
    """Text context (``[layers, B, 77, D]`` for XTI) and the UNet's prediction, as the train step has them."""
    context = train_step_lib.text_context(spec, params, ids)
    return context, spec.unet.apply({"params": params["unet"]}, latents, timesteps, context)


_COMPILED = {}


def _mlmjax_forward(spec, params, ids, latents, timesteps):
    """:func:`_forward`, compiled once per architecture.

    The specs of separately built runs never compare equal (their Flax modules are distinct objects),
    so jitting on the spec would recompile for every case; their configs do compare by value.
    """
    key = (spec.text_encoder.config, spec.text_encoder.dtype, spec.unet.config, spec.unet.dtype, spec.layer_tokens)
    if key not in _COMPILED:  # these one-off graphs compile faster than they run slower without LLVM's optimisations
        _COMPILED[key] = jax.jit(functools.partial(_forward, spec),
                                 compiler_options={"xla_backend_optimization_level": 0})
    return _COMPILED[key](params, ids, latents, timesteps)


def _torch_unet(pipe, latents, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        out = pipe.unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                        encoder_hidden_states=context).sample
    return out.permute(0, 2, 3, 1).numpy()


def _pipeline(folder: str, **components):
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, **components)


# How each export loads, as its README says (OUT = the export folder).
def _load_ti(base: str, out: str):
    pipe = _pipeline(base)
    pipe.load_textual_inversion(out)
    return pipe


def _load_dreambooth(base: str, out: str):
    del base
    return _pipeline(out)


def _load_custom_diffusion(base: str, out: str):
    if os.path.isdir(os.path.join(out, "text_encoder")):
        text_encoder = transformers.CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"))
        tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
        pipe = _pipeline(base, text_encoder=text_encoder, tokenizer=tokenizer)
    else:
        pipe = _load_ti(base, out)
    pipe.unet.load_attn_procs(out, weight_name=export_lib.CUSTOM_DIFFUSION_FILE, _pipeline=pipe)
    return pipe


_META = ["README.md", "export.json"]
CASES = {
    "ti": (None, _load_ti, ["learned_embeds.safetensors"]),
    "dreambooth": (None, _load_dreambooth, [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]),
    # The authors' default: K/V, the token and the whole text encoder.
    "custom_diffusion": (None, _load_custom_diffusion, [
        "learned_embeds.safetensors", "pytorch_custom_diffusion_weights.safetensors", "text_encoder/config.json",
        "text_encoder/model.safetensors"]),
    # The original Custom Diffusion with Q and out trained too: no text encoder.
    "custom_diffusion:no_text_encoder,qo": ("no_text_encoder,qo", _load_custom_diffusion, [
        "learned_embeds.safetensors", "pytorch_custom_diffusion_weights.safetensors"]),
}


def _files(out: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out) for n in names)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_diffusers_and_matches(case, base, tmp_path):
    options, load, expected = CASES[case]
    run, untrained = _run(case.split(":")[0], options, base, str(tmp_path / "run"))
    out = str(tmp_path / "export")
    written = export_lib.export(run, out)
    assert written == [os.path.join(out, f) for f in _files(out)]
    files = [f for f in _files(out) if not f.startswith("tokenizer/")]  # tokenizer files vary with transformers
    assert files == sorted(expected + _META)
    assert os.path.isdir(os.path.join(out, "tokenizer")) == ("text_encoder/config.json" in expected)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no staging folder left behind
    manifest = json.load(open(os.path.join(out, "export.json")))
    assert manifest["step"] == 11 and manifest["concept_tokens"] == ["<teapot1>"]

    ids, latents, timesteps = _inputs(run.model.tokenizer)
    context, eps = _mlmjax_forward(run.spec, run.params, ids, latents, timesteps)
    pipe = load(base, out)
    assert pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch_context = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    text_error = relative_error(torch_context.numpy(), context)
    unet_error = relative_error(_torch_unet(pipe, latents, timesteps, torch_context), eps)
    print(f"{case}: text rel err {text_error:.1e}, UNet rel err {unet_error:.1e}")
    assert text_error <= TEXT_TOLERANCE and unet_error <= UNET_TOLERANCE
    # The trained values matter here, so matching them means they were exported.
    assert relative_error(_mlmjax_forward(run.spec, untrained, ids, latents, timesteps)[1], eps) > 1e-2


def _torch_attn2_names(unet) -> list[str]:
    """The torch UNet's attn2 modules in execution order: down blocks, mid block, up blocks."""
    names = {id(module): name for name, module in unet.named_modules()}
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [names[id(tb.attn2)] for block in blocks for attention in getattr(block, "attentions", ())
            for tb in attention.transformer_blocks]


def test_xti_tokens_feed_their_layers_in_diffusers(base, tmp_path):
    run, untrained = _run("xti", None, base, str(tmp_path / "run"))
    out = str(tmp_path / "export")
    export_lib.export(run, out)
    assert _files(out) == sorted([f"learned_embeds_{k}.safetensors" for k in range(7)] + _META)
    manifest = json.load(open(os.path.join(out, "export.json")))
    tokens = [t["token"] for t in manifest["tokens"]]
    assert tokens == ["<teapot1>"] + [f"<teapot1>_{k}" for k in range(1, 7)] == run.concept_tokens

    pipe = _pipeline(base)
    pipe.load_textual_inversion([os.path.join(out, t["file"]) for t in manifest["tokens"]])
    assert [name for name, _ in manifest["layers"]] == _torch_attn2_names(pipe.unet)
    assert [tokens.index(token) for _, token in manifest["layers"]] == list(run.spec.layer_tokens)
    for t in manifest["tokens"]:
        assert t["layers"] == [name for name, token in manifest["layers"] if token == t["token"]]
    # What the README warns about: the pipeline's own prompt handling reads the tokens as one multi-vector token.
    assert pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer).count("<teapot1>_") == 6

    ids, latents, timesteps = _inputs(run.model.tokenizer)
    stack, eps = _mlmjax_forward(run.spec, run.params, ids, latents, timesteps)
    features = {}
    with torch.no_grad():
        for token in tokens:
            token_ids = pipe.tokenizer(PROMPT.replace(tokens[0], token), padding="max_length", truncation=True,
                                       max_length=77, return_tensors="pt").input_ids
            assert token_ids[0, 5] == pipe.tokenizer.convert_tokens_to_ids(token) == 49408 + tokens.index(token)
            features[token] = pipe.text_encoder(token_ids)[0]
    text_errors = [relative_error(features[token].numpy(), stack[n])
                   for n, (_, token) in enumerate(manifest["layers"])]

    def feed(context):
        return lambda module, args, kwargs: (args, {**kwargs, "encoder_hidden_states": context})

    hooks = [pipe.unet.get_submodule(name).register_forward_pre_hook(feed(features[token]), with_kwargs=True)
             for name, token in manifest["layers"]]
    try:
        torch_eps = _torch_unet(pipe, latents, timesteps, torch.zeros_like(features[tokens[0]]))
    finally:
        for hook in hooks:
            hook.remove()
    unet_error = relative_error(torch_eps, eps)
    print(f"xti: text rel err per layer ≤ {max(text_errors):.1e}, UNet rel err {unet_error:.1e}")
    assert max(text_errors) <= TEXT_TOLERANCE and unet_error <= UNET_TOLERANCE
    assert relative_error(_mlmjax_forward(run.spec, untrained, ids, latents, timesteps)[1], eps) > 1e-2


def test_refuses_a_non_empty_out_unless_overwrite(base, tmp_path):
    run, _ = _run("ti", None, base, str(tmp_path / "run"))
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=re.escape(f"{out}: exists and is not empty;")):
        export_lib.export(run, str(out))
    assert os.listdir(out) == ["keep.txt"]
    export_lib.export(run, str(out), overwrite=True)
    assert _files(str(out)) == sorted(["learned_embeds.safetensors"] + _META)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        export_lib.export(run, str(tmp_path / "file"))
    # Replacing the folder that holds the run (or its base model) would delete it.
    os.makedirs(run.workdir)
    for holder in (run.workdir, str(tmp_path)):
        with pytest.raises(ValueError, match="must not replace"):
            export_lib.export(run, holder, overwrite=True)
    assert os.path.isdir(run.workdir) and os.path.isdir(base)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_refuses_a_run_that_trained_what_its_format_cannot_hold(base, tmp_path):
    run, _ = _run("ti", None, base, str(tmp_path / "run"))
    extra = {"unet": {"conv_in": {"bias": np.zeros(16, np.float32)}}}
    with pytest.raises(ValueError, match="trained unet/conv_in/bias, which the ti export format cannot hold"):
        export_lib.export(dataclasses.replace(run, trained={**run.trained, **extra}), str(tmp_path / "out"))
    run, _ = _run("custom_diffusion", None, base, str(tmp_path / "run"))
    extra = {"unet": {**run.trained["unet"], "conv_in": {"bias": np.zeros(16, np.float32)}}}
    with pytest.raises(ValueError, match="trained unet/conv_in/bias, which the custom_diffusion export"):
        export_lib.export(dataclasses.replace(run, trained={**run.trained, **extra}), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------
# The command line


def test_cli_exports_a_checkpoint(base, tmp_path, capsys):
    import safetensors.numpy

    run, _ = _run("ti", None, base, str(tmp_path / "run"))
    identity = {"config": json.loads(run.config.to_json()),
                "fingerprints": {"pretrained": workdir_lib.model_fingerprint(base)}}
    workdir_lib.write_run_files(run.workdir, run.config, identity)
    checkpointer = checkpoint_lib.Checkpointer(run.workdir, async_save=False)
    state = method_lib.build_state(run.config, tiny.tiny_pretrained(), contextualizer_folder=None).state
    checkpointer.save(7, params=run.trained, opt_state=state.opt_state, rng=jax.random.key(0), data={}, run=identity)
    checkpointer.close()

    out = str(tmp_path / "export")
    export_lib.main(["--workdir", run.workdir, "--out", out])
    assert capsys.readouterr().out.splitlines() == [os.path.join(out, f) for f in _files(out)]
    saved = safetensors.numpy.load_file(os.path.join(out, "learned_embeds.safetensors"))
    np.testing.assert_array_equal(saved["<teapot1>"], run.trained["concept"]["embeddings"])
    assert json.load(open(os.path.join(out, "export.json")))["step"] == 7

    new = f"{tmp_path}/x"
    for args, message in [(["--out", out], f"error: {out}: exists and is not empty"),
                          (["--out", new, "--workdir", f"{tmp_path}/nowhere"], "nowhere: not an mlmjax run"),
                          (["--out", new, "--step", "3"], "no checkpoint at step 3"),
                          (["--step", "3"], "the following arguments are required: --out")]:
        with pytest.raises(SystemExit) as exit_info:
            export_lib.main(["--workdir", run.workdir, *args])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not os.path.exists(new)


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("")
    result = subprocess.run([sys.executable, "-m", "mlmjax.export", "--workdir", str(tmp_path / "run"), "--out",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"error: {tmp_path / 'out'}: exists and is not empty; choose a new folder or "
                                     "pass --overwrite")
