"""The Flax CLIP text encoder against transformers' ``CLIPTextModel`` (PyTorch, CPU, float32)."""

import copy
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from helpers import relative_error
from mlmjax import weights
from mlmjax.models import clip_text

TOLERANCE = 1e-5

_TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=77,
             projection_dim=32)
CASES = {
    # SD 1.x text encoders ship with the pre-2023 eos_token_id=2: pooling takes the largest id.
    "sd1_legacy_eos": dict(_TINY, hidden_act="quick_gelu", num_hidden_layers=2, vocab_size=1000,
                           bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # The corrected CLIP ids with the real vocabulary size; padding with EOS, as SD 1.x's tokenizer does.
    "sd1_eos_49407": dict(_TINY, hidden_act="quick_gelu", num_hidden_layers=2, vocab_size=49408,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
    # SD 2.x: exact GELU, another depth and head size, padding with id 0.
    "sd2": dict(hidden_act="gelu", hidden_size=48, intermediate_size=96, num_attention_heads=3,
                num_hidden_layers=3, max_position_embeddings=77, projection_dim=48, vocab_size=1000,
                bos_token_id=998, eos_token_id=999, pad_token_id=0),
}


@dataclasses.dataclass
class Reference:
    torch_model: transformers.CLIPTextModel
    folder: str
    module: clip_text.CLIPTextModel
    params: dict
    ids: np.ndarray  # [B, 77] tokenizer-like: BOS, words, EOS, padding
    weight: np.ndarray  # [B, 77, D]: the gradient tests differentiate sum(last_hidden_state * weight)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, layer-norm scales around 1, so no identity or zero hides an error."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.2 * torch.randn(param.shape, generator=generator)
            param.copy_(1 + noise if "layer_norm" in name and name.endswith("weight") else noise)


def _token_ids(config: clip_text.CLIPTextConfig, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    length = config.max_position_embeddings
    specials = {config.bos_token_id, config.eos_token_id, config.pad_token_id}
    words = np.array([i for i in range(min(config.vocab_size, 49406)) if i not in specials])
    ids = np.full((3, length), config.pad_token_id, np.int32)
    for row, count in enumerate([4, 30, length - 2]):
        ids[row, 0] = config.bos_token_id
        ids[row, 1:count + 1] = rng.choice(words, count)
        ids[row, count + 1] = config.eos_token_id
    return ids


def _abstract(module):
    return jax.eval_shape(lambda rng: clip_text.init_params(module, rng), jax.random.key(0))


def _load(folder: str, module) -> dict:
    state_dict, source = weights.read_safetensors(folder, "model.safetensors")
    return weights.params_from_state_dict(state_dict, _abstract(module), source=source,
                                          rename=clip_text.rename_checkpoint_key,
                                          ignore=clip_text.IGNORED_CHECKPOINT_KEYS)


@pytest.fixture(scope="module", params=list(CASES))
def ref(request, tmp_path_factory) -> Reference:
    torch_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CASES[request.param])).eval()
    _randomize(torch_model, seed=len(request.param))
    folder = str(tmp_path_factory.mktemp(request.param))
    torch_model.save_pretrained(folder)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = clip_text.CLIPTextConfig.from_dict(json.load(f), config_path)
    module = clip_text.CLIPTextModel(config)
    ids = _token_ids(config)
    weight = np.random.default_rng(1).standard_normal((*ids.shape, config.hidden_size)).astype(np.float32)
    return Reference(torch_model, folder, module, _load(folder, module), ids, weight)


def _torch_encode(model: transformers.CLIPTextModel, ids: np.ndarray, weight: np.ndarray) -> dict:
    """Outputs and the gradient w.r.t. the token embeddings; transformers 5's CLIPTextModel takes no
    inputs_embeds, so a hook turns the embedding lookup's output into a leaf."""
    leaf = {}

    def make_leaf(module, inputs, output):
        leaf["embeds"] = output.detach().requires_grad_()
        return leaf["embeds"]

    handle = model.embeddings.token_embedding.register_forward_hook(make_leaf)
    try:
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
        (out.last_hidden_state * torch.from_numpy(weight)).sum().backward()
    finally:
        handle.remove()
    return dict(last=out.last_hidden_state.detach(), hidden=[h.detach() for h in out.hidden_states],
                pooled=out.pooler_output.detach(), grad=leaf["embeds"].grad)


NUM_EXTRA = 2  # rows of extra_embeddings in every _encode call, so that all calls share one compile


@functools.partial(jax.jit, static_argnums=0)
def _encode(module, params, ids, extra, weight) -> dict:
    """The Flax side of :func:`_torch_encode`, through ``embed`` and ``inputs_embeds``.

    ``from_ids`` is ``module(ids)``, the plain-vocabulary path (NaN where ``ids`` use extra rows).
    """
    variables = {"params": params}

    def loss(embeds):
        last, hidden = module.apply(variables, None, inputs_embeds=embeds, output_hidden_states=True)
        return jnp.sum(last * weight), (last, hidden)

    embeds = module.apply(variables, ids, extra, method=module.embed)
    grad, (last, hidden) = jax.grad(loss, has_aux=True)(embeds)
    return dict(last=last, hidden=hidden, pooled=module.pooled_output(last, ids), grad=grad,
                from_ids=module.apply(variables, ids))


@pytest.fixture(scope="module")
def outputs(ref) -> tuple[dict, dict]:
    """(ours, transformers') for the reference's ids, which use no extra rows."""
    unused = np.zeros((NUM_EXTRA, ref.module.config.hidden_size), np.float32)
    return (_encode(ref.module, ref.params, ref.ids, unused, ref.weight),
            _torch_encode(ref.torch_model, ref.ids, ref.weight))


def test_hidden_states_match_transformers(ref, outputs):
    ours, theirs = outputs
    assert len(ours["hidden"]) == len(theirs["hidden"]) == ref.module.config.num_hidden_layers + 1
    assert relative_error(ours["last"], theirs["last"]) <= TOLERANCE
    for mine, expected in zip(ours["hidden"], theirs["hidden"]):
        assert relative_error(mine, expected) <= TOLERANCE
    # Calling with input_ids is the same computation as embed() followed by inputs_embeds.
    assert relative_error(ours["from_ids"], ours["last"]) <= 1e-6
    # hidden_states[-1] is the encoder output before the final layer norm, as in transformers.
    assert relative_error(ours["hidden"][-1], ours["last"]) > 0.1


def test_pooled_output_matches_transformers(outputs):
    ours, theirs = outputs
    assert relative_error(ours["pooled"], theirs["pooled"]) <= TOLERANCE


def test_gradient_wrt_token_embeddings_matches_transformers(outputs):
    ours, theirs = outputs
    assert relative_error(ours["grad"], theirs["grad"]) <= TOLERANCE


def test_prefixed_checkpoint_loads_identically(ref, tmp_path):
    """SD releases (and transformers 4) write `text_model.` keys plus the position_ids buffer."""
    tensors = safetensors.numpy.load_file(os.path.join(ref.folder, "model.safetensors"))
    tensors = {f"text_model.{key}": value for key, value in tensors.items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    params = _load(str(tmp_path), ref.module)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, ref.params))


def test_export_loads_in_transformers_and_diffusers(ref, tmp_path):
    import diffusers

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    state_dict = weights.state_dict_from_params(ref.params)
    weights.write_safetensors(str(folder / "model.safetensors"),
                              {clip_text.export_checkpoint_key(k): v for k, v in state_dict.items()})
    config = ref.module.config.to_dict()
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    with open(os.path.join(ref.folder, "config.json")) as f:
        source = json.load(f)
    assert {k: v for k, v in source.items() if k not in ("transformers_version", "dtype")}.items() <= config.items()

    loaded, info = transformers.CLIPTextModel.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.from_numpy(ref.ids).long()
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, ref.torch_model(ids).last_hidden_state)

    with open(tmp_path / "model_index.json", "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}, f)
    absent = dict.fromkeys(["unet", "vae", "tokenizer", "scheduler", "safety_checker", "feature_extractor",
                            "image_encoder"])
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path), **absent)
    expected = ref.torch_model.state_dict()
    got = pipeline.text_encoder.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_extra_embeddings_splice_into_lookup():
    config = clip_text.CLIPTextConfig(**CASES["sd1_eos_49407"])
    module = clip_text.CLIPTextModel(config)
    vocab, width = config.vocab_size, config.hidden_size
    rng = np.random.default_rng(2)
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    extra = rng.standard_normal((3, width)).astype(np.float32)
    ids = _token_ids(config)
    ids[:, 1], ids[0, 3], ids[2, 2] = vocab, vocab + 2, vocab + 2  # row vocab + 1 stays unused

    @jax.jit
    def embed(table, extra, ids):  # embed() needs only the token table
        params = {"embeddings": {"token_embedding": {"embedding": table}}}
        return module.apply({"params": params}, ids, extra, method=module.embed)

    np.testing.assert_array_equal(embed(table, extra, ids), np.concatenate([table, extra])[ids])
    np.testing.assert_array_equal(embed(table, None, ids[1:, 3:]), table[ids[1:, 3:]])

    weight = rng.standard_normal((*ids.shape, width)).astype(np.float32)
    grad_table, grad_extra = jax.jit(jax.grad(lambda t, e: jnp.sum(embed(t, e, ids) * weight), argnums=(0, 1)))(
        table, extra)
    expected_table, expected_extra = np.zeros_like(table), np.zeros_like(extra)
    is_extra = ids >= vocab
    np.add.at(expected_extra, ids[is_extra] - vocab, weight[is_extra])
    np.add.at(expected_table, ids[~is_extra], weight[~is_extra])
    np.testing.assert_allclose(grad_extra, expected_extra, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_table, expected_table, rtol=1e-6, atol=1e-6)
    assert not np.any(grad_extra[1])

    # Ids outside both ranges must not alias a valid row.
    invalid = np.asarray(embed(table, extra, np.array([[-1, vocab + 3, 5]])))
    assert np.isnan(invalid[0, :2]).all() and np.isfinite(invalid[0, 2]).all()
    assert np.isnan(np.asarray(embed(table, None, np.array([[vocab, -1]])))).all()


@pytest.mark.parametrize("ref", ["sd1_eos_49407"], indirect=True)
def test_extra_tokens_match_transformers_with_grown_table(ref):
    """Spliced rows encode as in transformers after ``resize_token_embeddings`` with those rows.

    With the corrected eos_token_id the pooled output stays at EOS although the new ids are larger.
    """
    vocab = ref.module.config.vocab_size
    extra = np.random.default_rng(4).standard_normal((NUM_EXTRA, ref.module.config.hidden_size)).astype(np.float32)
    ids = ref.ids.copy()
    ids[:, 2] = vocab + np.array([0, 1, 1])
    grown = copy.deepcopy(ref.torch_model)
    grown.resize_token_embeddings(vocab + NUM_EXTRA)
    with torch.no_grad():
        grown.embeddings.token_embedding.weight[vocab:] = torch.from_numpy(extra)
    theirs = _torch_encode(grown, ids, ref.weight)
    ours = _encode(ref.module, ref.params, ids, extra, ref.weight)
    for name in ("last", "pooled", "grad"):
        assert relative_error(ours[name], theirs[name]) <= TOLERANCE, name


def test_unsupported_hidden_act_is_named():
    with pytest.raises(weights.WeightsError) as error:
        clip_text.CLIPTextConfig.from_dict(dict(CASES["sd2"], hidden_act="gelu_new"), "sd/text_encoder/config.json")
    message = str(error.value)
    assert "\n" not in message
    for part in ("sd/text_encoder/config.json", "hidden_act", "gelu_new", "quick_gelu"):
        assert part in message


# The text encoders of SD 1.5 (OpenAI CLIP ViT-L/14) and SD 2.1 (OpenCLIP ViT-H/14).
FULL_SIZE = {
    "sd15": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2), 123_060_480),
    "sd21": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=2), 340_387_840),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameter_count(name):
    kwargs, count = FULL_SIZE[name]
    abstract = _abstract(clip_text.CLIPTextModel(clip_text.CLIPTextConfig.from_dict(kwargs, name)))
    assert sum(leaf.size for leaf in jax.tree.leaves(abstract)) == count
    with torch.device("meta"):
        reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs))
    assert sum(p.numel() for p in reference.parameters()) == count
