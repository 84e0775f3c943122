"""Full-size SD 1.5 and SD 2.1 folders (random weights, written by diffusers) load and match PyTorch.

These build ~1.1-1.3 B parameters in PyTorch and write ~5 GB per model, so they run only when
``MLMJAX_FULLSIZE=1`` (several minutes and ~20 GB of memory); the tiny tests cover the same code
paths and options on every run. Spatial sizes are kept small: the weights, not the activations, are
what this checks.

The reference is PyTorch in float64 on the same weights. At full width two float32 implementations
differ by their own rounding: PyTorch's float32 VAE decoder is itself 9.4e-6 away from its float64
result, so float32-vs-float32 comparisons measure rounding order, not the port.
"""

import os

import jax
import numpy as np
import pytest

import mlmjax
from mlmjax import tokenizer as tokenizer_lib
from helpers import relative_error

pytestmark = pytest.mark.skipif(os.environ.get("MLMJAX_FULLSIZE") != "1",
                                reason="full-size check; set MLMJAX_FULLSIZE=1 (needs ~16 GB, minutes)")

_SD_UNET = dict(
    act_fn="silu", block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
_SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu")
CONFIGS = {
    "sd15": dict(
        unet=dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
        vae=dict(_SD_VAE, sample_size=512),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu", projection_dim=768, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        scheduler=dict(prediction_type="epsilon"),
        params={"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    "sd21": dict(
        unet=dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                  use_linear_projection=True, upcast_attention=True),
        vae=dict(_SD_VAE, sample_size=768),
        text_encoder=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          hidden_act="gelu", projection_dim=512, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        scheduler=dict(prediction_type="v_prediction"),
        params={"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_size_folder_matches_pytorch(name, tmp_path):
    import diffusers
    import torch
    import transformers

    config = CONFIGS[name]
    torch.manual_seed(0)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**config["vae"]).eval(),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, **config["text_encoder"])).eval(),
        tokenizer=tokenizer_lib.vendored_tokenizer(),
        unet=diffusers.UNet2DConditionModel(**config["unet"]).eval(),
        scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          **config["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for component, count in config["params"].items():
        assert sum(p.numel() for p in getattr(pipeline, component).parameters()) == count
    pipeline.save_pretrained(tmp_path)

    model = mlmjax.load_pretrained(str(tmp_path))
    for component, count in config["params"].items():
        assert sum(x.size for x in jax.tree.leaves(model.params[component])) == count

    rng = np.random.default_rng(0)
    ids = tokenizer_lib.tokenize(model.tokenizer, ["a photo of a dog wearing a santa hat on the beach"])
    latents = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    timesteps = np.array([500])
    images = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    pipeline.text_encoder.double()
    pipeline.unet.double()
    pipeline.vae.double()
    with torch.no_grad():
        context_t = pipeline.text_encoder(torch.from_numpy(ids).long())[0]
        out_t = pipeline.unet(torch.from_numpy(latents).double().permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                              encoder_hidden_states=context_t).sample.permute(0, 2, 3, 1).numpy()
        dist = pipeline.vae.encode(torch.from_numpy(images).double().permute(0, 3, 1, 2)).latent_dist
        decoded_t = pipeline.vae.decode(dist.mean).sample.permute(0, 2, 3, 1).numpy()
    context = model.text_encoder.apply({"params": model.params["text_encoder"]}, ids)
    # Each network is fed the reference's own input, so each error is that network's alone.
    out = model.unet.apply({"params": model.params["unet"]}, latents, timesteps, context_t.float().numpy())
    mean, _ = model.vae.apply({"params": model.params["vae"]}, images, method=model.vae.encode)
    decoded = model.vae.apply({"params": model.params["vae"]}, dist.mean.float().permute(0, 2, 3, 1).numpy(),
                              method=model.vae.decode)
    errors = {"text_encoder": relative_error(context, context_t.numpy()), "unet": relative_error(out, out_t),
              "vae_mean": relative_error(mean, dist.mean.permute(0, 2, 3, 1).numpy()),
              "vae_decode": relative_error(decoded, decoded_t)}
    print(name, errors)
    assert errors["text_encoder"] <= 1e-5 and errors["vae_mean"] <= 1e-5 and errors["vae_decode"] <= 1e-5
    assert errors["unet"] <= 1e-4
