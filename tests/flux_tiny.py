"""A tiny random diffusers FLUX transformer (and its scheduler config) for the FLUX parity tests."""

from __future__ import annotations

import diffusers
import torch

FLUX_TINY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (FLUX.1-schnell: shift 1, no dynamic shifting)
FLUX_DEV_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                      "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def flux_transformer(guidance_embeds: bool = True, **kw) -> diffusers.FluxTransformer2DModel:
  """diffusers inits norms to 1 and biases to 0; random values make parity see every tensor."""
  torch.manual_seed(0)
  model = diffusers.FluxTransformer2DModel(**{**FLUX_TINY, "guidance_embeds": guidance_embeds, **kw})
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if "norm" in name and "linear" not in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
  return model.eval()
