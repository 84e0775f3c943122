"""The Flax UNet against diffusers' ``UNet2DConditionModel`` (PyTorch, CPU, float32), on tiny configs."""

import dataclasses
import functools
import json

import diffusers
import jax
import numpy as np
import pytest
import torch

from helpers import relative_error
from mlmjax import weights
from mlmjax.models import unet
from torch_reference import randomize_

TOLERANCE = 1e-4

CONFIGS = {
    # SD 1.x options: int head count, 1×1-conv projections; plus a plain down block, two transformer
    # layers per attention and an odd height, which makes the up blocks resample to the skips' sizes.
    "sd1": dict(block_out_channels=[32, 64, 64], down_block_types=["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2, layers_per_block=1,
                attention_head_dim=2, transformer_layers_per_block=2, cross_attention_dim=32, norm_num_groups=8),
    # SD 2.x options: per-block heads, linear projections, upcast attention; other timestep embedding,
    # centring, mid-block scale and eps values so that each config field is exercised.
    "sd2": dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D"] * 2,
                up_block_types=["CrossAttnUpBlock2D"] * 2, layers_per_block=2, attention_head_dim=[2, 4],
                use_linear_projection=True, upcast_attention=True, cross_attention_dim=24, norm_num_groups=16,
                norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, center_input_sample=True,
                mid_block_scale_factor=1.5, out_channels=3),
}
SHAPES = {"sd1": (18, 16), "sd2": (16, 16)}
TIMESTEPS = {"sd1": np.array([3, 917]), "sd2": 500.5}


@dataclasses.dataclass
class Reference:
    torch_model: diffusers.UNet2DConditionModel
    folder: str
    config: unet.UNetConfig
    params: dict
    state_dict: dict
    source: str


def _load(state_dict, config, source):
    abstract = jax.eval_shape(functools.partial(unet.init_params, unet.UNet2DConditionModel(config)),
                              jax.random.key(0))
    return weights.params_from_state_dict(state_dict, abstract, source=source, rename=unet.rename_checkpoint_key,
                                          ignore=unet.IGNORED_CHECKPOINT_KEYS)


@functools.cache  # built once per process and shared by the tests, which stay independent of each other
def _reference(name: str, root: str) -> Reference:
    folder = f"{root}/unet_{name}"
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    randomize_(model, seed=1)
    model.save_pretrained(folder)
    with open(f"{folder}/config.json") as f:
        config = unet.UNetConfig.from_dict(json.load(f), f"{folder}/config.json")
    state_dict, source = weights.read_safetensors(folder, "diffusion_pytorch_model.safetensors")
    return Reference(model, folder, config, _load(state_dict, config, source), state_dict, source)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp())


def _inputs(name, config, *, layers=None, seed=0):
    rng = np.random.default_rng(seed)
    h, w = SHAPES[name]
    sample = rng.standard_normal((2, h, w, config.in_channels), dtype=np.float32)
    context_shape = (2, 7, config.cross_attention_dim)
    if layers is not None:
        context_shape = (layers, *context_shape)
    context = rng.standard_normal(context_shape, dtype=np.float32)
    cotangent = rng.standard_normal((2, h, w, config.out_channels), dtype=np.float32)
    return sample, context, cotangent


# These one-off graphs compile faster than they run slower without LLVM's optimisations.
_JIT_OPTIONS = dict(static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(jax.jit, **_JIT_OPTIONS)
def _forward(module, params, sample, timesteps, context):
    return module.apply({"params": params}, sample, timesteps, context)


@functools.partial(jax.jit, **_JIT_OPTIONS)
def _forward_and_context_grad(module, params, sample, timesteps, context, cotangent):
    out, vjp = jax.vjp(lambda c: module.apply({"params": params}, sample, timesteps, c), context)
    return out, vjp(cotangent)[0]


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def _torch_sample(sample):
    return torch.tensor(sample).permute(0, 3, 1, 2)


def _torch_forward_and_context_grad(model, sample, timesteps, context, cotangent):
    context = torch.tensor(context, requires_grad=True)
    t = torch.tensor(timesteps) if isinstance(timesteps, np.ndarray) else timesteps
    out = model(_torch_sample(sample), t, context).sample.permute(0, 2, 3, 1)
    (out * torch.tensor(cotangent)).sum().backward()
    return out.detach().numpy(), context.grad.numpy()


@functools.cache
def _parity(name: str, root: str) -> tuple[np.ndarray, float, float]:
    """Our output and the relative errors of output and context gradient against diffusers."""
    ref = _reference(name, root)
    sample, context, cotangent = _inputs(name, ref.config)
    timesteps = TIMESTEPS[name]
    out, grad = _forward_and_context_grad(unet.UNet2DConditionModel(ref.config), ref.params, sample,
                                          timesteps, context, cotangent)
    want_out, want_grad = _torch_forward_and_context_grad(ref.torch_model, sample, timesteps, context, cotangent)
    return np.asarray(out), relative_error(out, want_out), relative_error(grad, want_grad)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_and_context_gradient_match_diffusers(root, name):
    _, out_error, grad_error = _parity(name, root)
    print(f"{name}: output rel err {out_error:.2e}, context-gradient rel err {grad_error:.2e}")
    assert out_error <= TOLERANCE and grad_error <= TOLERANCE


def _torch_attn2_in_documented_order(model):
    """Down blocks, mid block, up blocks; attentions and their transformer blocks in order."""
    blocks = [*model.down_blocks, model.mid_block, *model.up_blocks]
    return [tb.attn2 for block in blocks for attention in getattr(block, "attentions", ())
            for tb in attention.transformer_blocks]


def test_per_layer_contexts_follow_the_documented_order(root):
    ref = _reference("sd1", root)
    module = unet.UNet2DConditionModel(ref.config)
    n = unet.num_cross_attention_layers(ref.config)
    assert n == 14  # 2 down blocks × 1 attention × 2 layers, mid 2, 2 up blocks × 2 attentions × 2 layers
    sample, contexts, _ = _inputs("sd1", ref.config, layers=n)
    _, shared_context, _ = _inputs("sd1", ref.config)
    timesteps = TIMESTEPS["sd1"]

    shared = _parity("sd1", root)[0]  # the output for shared_context
    stacked = _forward(module, ref.params, sample, timesteps, np.broadcast_to(shared_context, contexts.shape))
    assert relative_error(stacked, shared) <= 1e-6

    out = _forward(module, ref.params, sample, timesteps, contexts)
    attn2 = _torch_attn2_in_documented_order(ref.torch_model)
    assert len(attn2) == n
    def feed(context):
        return lambda _, args, kwargs: (args, {**kwargs, "encoder_hidden_states": torch.tensor(context)})

    hooks = [m.register_forward_pre_hook(feed(c), with_kwargs=True) for m, c in zip(attn2, contexts)]
    try:
        with torch.no_grad():
            want = ref.torch_model(_torch_sample(sample), torch.tensor(timesteps),
                                   torch.zeros(contexts.shape[1:])).sample.permute(0, 2, 3, 1).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    error = relative_error(out, want)
    print(f"per-layer contexts: output rel err {error:.2e}")
    assert error <= TOLERANCE
    assert relative_error(out, shared) > 1e-2  # the distinct contexts do matter


def test_remat_gives_the_same_output_and_gradient():
    config = unet.UNetConfig(block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                             up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, attention_head_dim=2,
                             cross_attention_dim=16, norm_num_groups=8)
    rng = np.random.default_rng(0)
    abstract = jax.eval_shape(functools.partial(unet.init_params, unet.UNet2DConditionModel(config)),
                              jax.random.key(0))
    params = jax.tree.map(lambda leaf: 0.2 * rng.standard_normal(leaf.shape, dtype=np.float32), abstract)
    sample, cotangent = rng.standard_normal((2, 2, 8, 8, 4), dtype=np.float32)
    context = rng.standard_normal((2, 5, 16), dtype=np.float32)
    args = (params, sample, np.array([10, 700]), context, cotangent)
    plain = _forward_and_context_grad(unet.UNet2DConditionModel(config), *args)
    remat = _forward_and_context_grad(unet.UNet2DConditionModel(config, remat=True), *args)
    for a, b in zip(remat, plain):  # equal up to float reassociation in the recomputation
        assert relative_error(a, b) <= 1e-5


def test_sd15_shapes_and_block_groups():
    config = unet.UNetConfig.from_dict({"cross_attention_dim": 768, "sample_size": 64}, "sd15")
    abstract = jax.eval_shape(functools.partial(unet.init_params, unet.UNet2DConditionModel(config)),
                              jax.random.key(0))
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)) == 859_520_964
    assert unet.num_cross_attention_layers(config) == 16
    assert unet.cross_attention_block_groups(config) == [0, 0, 1, 1, 2, 2, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6]


def test_config_round_trips_through_diffusers(root):
    ref = _reference("sd2", root)
    exported = ref.config.to_dict()
    assert exported["_class_name"] == "UNet2DConditionModel"
    assert unet.UNetConfig.from_dict(exported, "exported") == ref.config
    rebuilt = diffusers.UNet2DConditionModel.from_config(exported)
    assert rebuilt.config.attention_head_dim == [2, 4] and rebuilt.config.use_linear_projection


@pytest.mark.parametrize("edit, key", [
    (lambda sd: sd.pop("mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight"),
     "mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight"),
    (lambda sd: sd.__setitem__("up_blocks.1.attentions.0.extra.weight", np.zeros(3, np.float32)),
     "up_blocks.1.attentions.0.extra.weight"),
    (lambda sd: sd.__setitem__("conv_in.weight", np.zeros((32, 4, 3, 1), np.float32)), "conv_in.weight"),
])
def test_loader_names_the_offending_tensor(root, edit, key):
    ref = _reference("sd1", root)
    state_dict = dict(ref.state_dict)
    edit(state_dict)
    with pytest.raises(weights.WeightsError, match=key.replace(".", r"\.")):
        _load(state_dict, ref.config, ref.source)


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text_time"), ("class_embed_type", "timestep"), ("time_cond_proj_dim", 256),
    ("encoder_hid_dim", 1024), ("dual_cross_attention", True), ("resnet_time_scale_shift", "scale_shift"),
    ("act_fn", "gelu"), ("only_cross_attention", [True, False]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]), ("transformer_layers_per_block", [1, 2]),
    ("cross_attention_dim", [768, 1024]), ("dropout", 0.1), ("some_new_option", 1),
])
def test_unsupported_config_field_is_refused(key, value):
    d = dict(CONFIGS["sd2"], _class_name="UNet2DConditionModel", _diffusers_version="0.42.1")
    d[key] = value
    with pytest.raises(weights.WeightsError, match=rf"^unet/config\.json: .*{key}") as error:
        unet.UNetConfig.from_dict(d, "unet/config.json")
    assert "\n" not in str(error.value)
