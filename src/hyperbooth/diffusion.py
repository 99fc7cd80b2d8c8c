"""The diffusion loss every method trains with (METHOD section 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from hyperbooth.errors import HyperboothError


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw z0 from cached VAE posteriors (mean, std are already multiplied by scaling_factor)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return mean + std * eps.to(mean.dtype)


def diffusion_target(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict, read from scheduler.config.prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def check_max_timestep(max_timestep: int | None, num_train_timesteps: int | None = None) -> None:
    """A one-line error unless max_timestep is unset or a timestep bound in 1..num_train_timesteps."""
    if max_timestep is None:
        return
    if max_timestep < 1:
        raise HyperboothError(f"--max-timestep must be >= 1, got {max_timestep}")
    if num_train_timesteps is not None and max_timestep > num_train_timesteps:
        raise HyperboothError(
            f"--max-timestep {max_timestep} is past this base's {num_train_timesteps} timesteps; "
            f"give 1-{num_train_timesteps}"
        )


def draw_noise(
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    generator: torch.Generator,
    max_timestep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise like `latents` and one timestep per element in [0, max_timestep), from `generator`."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(latents.device, latents.dtype)
    high = scheduler.config.num_train_timesteps
    if max_timestep is not None:
        if not 1 <= max_timestep <= high:
            raise ValueError(f"max_timestep must be in [1, {high}], got {max_timestep}")
        high = max_timestep
    timesteps = torch.randint(0, high, (latents.shape[0],), generator=generator)
    return noise, timesteps.to(latents.device)


def diffusion_loss(
    unet: nn.Module,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator,
    reduce: bool = True,
    mask: torch.Tensor | None = None,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction on noised latents and its target.

    All randomness (noise, timesteps) comes from `generator` (a CPU generator), so a step is a
    pure function of its seed: that is what makes resume exact.
    With reduce=False the loss is per batch element (B,). A mask (B, 1, h, w) of 0/1 restricts
    each element's mean to where it is 1 (Custom Diffusion's padded, shrunk images).
    Timesteps are drawn from [0, max_timestep) (default: every training timestep).
    """
    noise, timesteps = draw_noise(scheduler, latents, generator, max_timestep)
    return noised_loss(
        unet, scheduler, latents, encoder_hidden_states, noise, timesteps, reduce, mask
    )


def noised_loss(
    unet: nn.Module,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    reduce: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusion loss for given noise and timesteps (mean, or per batch element)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    # A base stored in half precision takes half-precision inputs; the loss stays float32.
    dtype = next(unet.parameters()).dtype
    prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states.to(dtype)).sample
    target = diffusion_target(scheduler, latents, noise, timesteps)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    dims = tuple(range(1, loss.dim()))
    if mask is None:
        loss = loss.mean(dim=dims)
    else:
        mask = mask.to(loss.device, loss.dtype).expand_as(loss)
        loss = (loss * mask).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1)
    return loss.mean() if reduce else loss
