"""The contextualizer against the PyTorch ContextNetV3 (PAPER.md §1.2; ``mlmjax.bench_torch``), and its converter."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from helpers import relative_error
from mlmjax import bench_torch, convert_contextualizer, weights
from mlmjax.models import contextualizer as ctx

SMALL = ctx.ContextualizerConfig(hidden_size=32, num_heads=4, ffn_size=128, vocab_size=100)
# Jitted: one compilation instead of one per operation, which dominates eager runs at these sizes.
init_params = jax.jit(ctx.init_params, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames="method")
def apply(module: ctx.Contextualizer, params, x, method=None):
    return module.apply({"params": params}, x, method=method)


def TorchContextNetV3(config: ctx.ContextualizerConfig):
    """The PyTorch reference (mlmjax.bench_torch's, the one the benchmark times), from a config."""
    return bench_torch.contextualizer_class()(config.to_dict())


def random_torch_model(config: ctx.ContextualizerConfig, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales and biases too), so no mapping error hides behind 0 or 1."""
    torch.manual_seed(seed)
    model = TorchContextNetV3(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 1.0 / np.sqrt(param.shape[-1]) if param.ndim > 1 else 0.1
            is_norm_scale = name.startswith("layer_norm") and name.endswith("weight")
            param.copy_(torch.randn(param.shape) * scale + float(is_norm_scale))
    return model


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def loaded(config: ctx.ContextualizerConfig, seed: int = 0) -> tuple[ctx.Contextualizer, dict]:
    """The module and the parameters of :func:`random_torch_model`, no initialisation to compile."""
    state_dict = {k: v.numpy() for k, v in random_torch_model(config, seed).state_dict().items()}
    module = ctx.Contextualizer(config)
    return module, ctx.params_from_state_dict(state_dict, module, "random")


def inputs(config: ctx.ContextualizerConfig, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, config.num_positions, config.hidden_size),
                                                       dtype=np.float32)


@pytest.mark.parametrize("ffn_residual", [False, True])
def test_matches_pytorch(tmp_path, ffn_residual):
    config = ctx.ContextualizerConfig(**{**SMALL.to_dict(), "ffn_residual": ffn_residual})
    model = random_torch_model(config)
    path = str(tmp_path / "cls_net.safetensors")
    safetensors.torch.save_file(model.state_dict(), path)  # includes the position_ids buffer
    module = ctx.Contextualizer(config)
    params = ctx.params_from_state_dict(safetensors.numpy.load_file(path), module, path)
    x = inputs(config)
    logits = apply(module, params, x)
    expected = torch_logits(model, x)
    assert logits.shape == (2, config.num_positions, config.vocab_size)
    assert relative_error(logits, expected) <= 1e-5


def test_logits_at_selected_positions_equal_full_logits():
    module, params = loaded(SMALL)
    x = inputs(SMALL)
    full = apply(module, params, x)
    features = apply(module, params, x, method="encode")
    batch_index, position = np.array([0, 1, 1]), np.array([3, 0, 76])
    selected = apply(module, params, features[batch_index, position], method="logits")
    assert relative_error(selected, full[batch_index, position]) <= 1e-6  # float32 roundoff, other matmul tiling


def test_authors_checkpoint_keys_load_with_ddp_prefix_and_export_back():
    model = random_torch_model(SMALL)
    state_dict = {"module." + k: v.numpy() for k, v in model.state_dict().items()}
    module = ctx.Contextualizer(SMALL)
    params = ctx.params_from_state_dict(state_dict, module, "ddp")
    exported = ctx.state_dict_from_params(params, SMALL)
    fresh = TorchContextNetV3(SMALL)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)


def test_missing_tensor_is_named():
    state_dict = {k: v.numpy() for k, v in random_torch_model(SMALL).state_dict().items()}
    del state_dict["multi_head_attention3.in_proj_bias"]
    with pytest.raises(weights.WeightsError, match="multi_head_attention3.in_proj_bias"):
        ctx.params_from_state_dict(state_dict, ctx.Contextualizer(SMALL), "broken")


def test_init_statistics_follow_the_authors():
    config = ctx.ContextualizerConfig(hidden_size=128, num_heads=4, ffn_size=512, vocab_size=2000)
    # The statistics do not depend on the generator; RBG keys compile in a fraction of threefry's time.
    params = init_params(ctx.Contextualizer(config), jax.random.key(0, impl="rbg"))
    d = config.hidden_size
    expected_std = {
        ("position_embedding", "embedding"): 0.02,
        ("final", "kernel"): 768**-0.5,  # hard-coded 768 in the authors' script, whatever the width
    }
    for i in range(1, 5):
        expected_std[(f"multi_head_attention{i}", "in_proj_weight")] = d**-0.5 * 16**-0.5
        expected_std[(f"multi_head_attention{i}", "out_proj", "kernel")] = d**-0.5
    for i in range(1, 4):  # PyTorch's default Linear init: U(±1/√fan_in), std 1/√(3·fan_in)
        expected_std[(f"feed_forward{i}", "W_ff1", "kernel")] = (3 * d) ** -0.5
        expected_std[(f"feed_forward{i}", "W_ff2", "kernel")] = (3 * config.ffn_size) ** -0.5
    for path, std in expected_std.items():
        value = np.asarray(functools.reduce(lambda node, key: node[key], path, params))
        assert abs(value.std() / std - 1) < 0.03, (path, value.std(), std)
        assert abs(value.mean()) < 0.05 * std, path
        if path[0].startswith("feed_forward"):
            assert np.abs(value).max() <= np.sqrt(3) * std
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(k.key for k in path)
        if name.endswith("bias"):  # every bias, FFN ones included: the authors zero all of them
            assert not np.any(value), name
        if name.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0)


def test_full_size_parameter_count():
    module = ctx.Contextualizer(ctx.ContextualizerConfig())
    shapes = ctx.abstract_params(module)
    # pos 77·768; 4 × MHA (3·768² + 3·768 + 768² + 768); 4 × LN 2·768; 3 × FFN (2·768·3072 + 3072 + 768);
    # final 768·49409 + 49409.
    expected = 59_136 + 4 * 2_362_368 + 4 * 1_536 + 3 * 4_722_432 + 37_995_521
    assert expected == 61_677_569
    assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == expected
    with torch.device("meta"):
        reference = TorchContextNetV3(ctx.ContextualizerConfig())
    assert sum(p.numel() for p in reference.parameters()) == expected
    assert shapes["final"]["kernel"].size + shapes["final"]["bias"].size == 37_995_521


def test_converter_round_trip(tmp_path, capsys):
    model = random_torch_model(SMALL, seed=3)
    cls_net = tmp_path / "cls_net_100000_ckpt.pt"
    mask_embeds = tmp_path / "mask_embeds_100000_ckpt.pt"
    # As the authors save them: the DDP-wrapped state dict and {"[MASK]": [1, D]}.
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, cls_net)
    mask = torch.randn(1, SMALL.hidden_size)
    torch.save({"[MASK]": mask}, mask_embeds)
    out = tmp_path / "converted"
    convert_contextualizer.main(["--cls_net", str(cls_net), "--mask_embeds", str(mask_embeds), "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / ctx.CONFIG_NAME).read_text()) == SMALL.to_dict()
    module, params, mask_embedding = ctx.load_contextualizer(str(out))
    assert module.config == SMALL
    np.testing.assert_array_equal(mask_embedding, mask.numpy()[0])
    x = inputs(SMALL)
    assert relative_error(apply(module, params, x), torch_logits(model, x)) <= 1e-5
    # save_contextualizer writes what load_contextualizer reads, bit for bit.
    ctx.save_contextualizer(str(tmp_path / "again"), module.config, params, mask_embedding)
    _, params_again, mask_again = ctx.load_contextualizer(str(tmp_path / "again"))
    jax.tree.map(np.testing.assert_array_equal, params_again, params)
    np.testing.assert_array_equal(mask_again, mask_embedding)


def test_converter_rejects_a_wrong_mask_embedding(tmp_path):
    cls_net, mask_embeds = tmp_path / "c.pt", tmp_path / "m.pt"
    torch.save(random_torch_model(SMALL).state_dict(), cls_net)
    torch.save({"[MASK]": torch.zeros(1, SMALL.hidden_size + 1)}, mask_embeds)
    with pytest.raises(SystemExit, match="mask embedding has shape"):
        convert_contextualizer.main(["--cls_net", str(cls_net), "--mask_embeds", str(mask_embeds),
                                     "--out", str(tmp_path / "out")])


def test_bfloat16_compute_is_close():
    module, params = loaded(SMALL)
    x = inputs(SMALL)
    half = apply(ctx.Contextualizer(SMALL, dtype=jnp.bfloat16), params, x)
    assert half.dtype == jnp.bfloat16
    assert relative_error(half.astype(jnp.float32), apply(module, params, x)) < 0.05
