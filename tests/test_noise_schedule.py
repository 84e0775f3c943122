"""The forward process matches diffusers' DDPMScheduler exactly (same float32 arithmetic)."""

import numpy as np
import pytest
import torch

from mlmjax.noise_schedule import NoiseSchedule


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers(beta_schedule, prediction_type):
    import diffusers

    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule,
                  prediction_type=prediction_type)
    reference = diffusers.DDPMScheduler(**config)
    schedule = NoiseSchedule.from_config(config)
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-6)  # a few float32 ulps: linspace rounds differently
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 8, 8, 4)).astype(np.float32)
    timesteps = np.array([0, 999, 1, 500, 250, 731, 10, 42])
    x0, noise = x0.reshape(8, 3, 8, 4), noise.reshape(8, 3, 8, 4)
    noisy = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps))
    np.testing.assert_allclose(schedule.add_noise(x0, noise, timesteps), noisy.numpy(), rtol=1e-5, atol=1e-6)
    want = noise if prediction_type == "epsilon" else reference.get_velocity(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps)).numpy()
    np.testing.assert_allclose(schedule.target(x0, noise, timesteps), want, rtol=1e-5, atol=1e-6)


def test_unknown_schedule_is_a_named_error():
    with pytest.raises(ValueError, match="beta_schedule 'cosine'"):
        NoiseSchedule.from_config({"beta_schedule": "cosine"}, "scheduler/scheduler_config.json")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        NoiseSchedule.from_config({"prediction_type": "sample"})
