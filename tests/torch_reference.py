"""PyTorch reference pipelines (diffusers + transformers, CPU) written as diffusers-layout folders.

Test-only: mlmjax itself never imports torch.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from mlmjax import tiny
from mlmjax import tokenizer as tokenizer_lib


def _kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def sd_like_configs(version: int) -> dict[str, dict]:
    """Tiny configs with the options of SD 1.x (version=1) or SD 2.x (version=2)."""
    configs = {"text_encoder": copy.deepcopy(tiny.TEXT_ENCODER_CONFIG), "unet": copy.deepcopy(tiny.UNET_CONFIG),
               "vae": copy.deepcopy(tiny.VAE_CONFIG), "scheduler": copy.deepcopy(tiny.SCHEDULER_CONFIG)}
    if version == 2:
        configs["text_encoder"].update(hidden_act="gelu", num_hidden_layers=3, pad_token_id=0)
        configs["unet"].update(attention_head_dim=[1, 2, 2, 2], use_linear_projection=True, upcast_attention=True)
        configs["scheduler"].update(prediction_type="v_prediction")
    return configs


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, norms and biases included, so no mapping hides behind 0/1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:  # weights: keep activations of order one
                param.copy_(noise * 0.5 / np.sqrt(param[0].numel()))
            elif name.endswith("weight"):  # the only 1-D weights are norm scales
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def build_pipeline(version: int, seed: int = 0):
    """A diffusers ``StableDiffusionPipeline`` with tiny random networks."""
    import diffusers
    import transformers

    configs = sd_like_configs(version)
    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_kwargs(configs["text_encoder"])))
    unet = diffusers.UNet2DConditionModel(**_kwargs(configs["unet"]))
    vae = diffusers.AutoencoderKL(**_kwargs(configs["vae"]))
    for offset, module in enumerate((text_encoder, unet, vae)):
        randomize_(module, seed + offset)
    scheduler = diffusers.DDPMScheduler.from_config(configs["scheduler"])
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer_lib.vendored_tokenizer(),
        unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def text_unet_forward(pipeline, input_ids: np.ndarray, latents_nhwc: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """The UNet's prediction conditioned on the text encoder's output, as the train step computes it."""
    with torch.no_grad():
        context = pipeline.text_encoder(torch.from_numpy(input_ids).long())[0]
        sample = torch.from_numpy(latents_nhwc).permute(0, 3, 1, 2)
        out = pipeline.unet(sample, torch.from_numpy(timesteps), encoder_hidden_states=context).sample
    return out.permute(0, 2, 3, 1).numpy()


def vae_roundtrip(pipeline, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, logvar, decoded mean) of the reference VAE, NHWC."""
    with torch.no_grad():
        dist = pipeline.vae.encode(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).latent_dist
        decoded = pipeline.vae.decode(dist.mean).sample
    to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    return to_nhwc(dist.mean), to_nhwc(dist.logvar), to_nhwc(decoded)
