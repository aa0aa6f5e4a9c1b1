"""FFN inputs captured on calibration tokens: what the clusters init groups, and what the baselines fit routers and
thresholds to."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from upcycle.models.surgery import find_ffns


@torch.no_grad()
def collect_ffn_inputs(model: nn.Module, inputs: torch.Tensor, batch_size: int = 8,
                       max_tokens: int = 8192) -> dict[str, torch.Tensor]:
    """Per SwiGLU FFN, its input hidden states [T, D] on blocks inputs [N, L] (at most `max_tokens` rows)."""
    ffns = find_ffns(model)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name, _ in ffns}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        for name, mlp in ffns:
            hook = mlp.register_forward_hook(
                lambda m, args, out, name=name: captured[name].append(args[0].reshape(-1, args[0].shape[-1]).cpu()))
            stack.callback(hook.remove)
        seen = 0
        for start in range(0, inputs.shape[0], batch_size):
            if seen >= max_tokens:
                break
            batch = inputs[start:start + batch_size]
            model(input_ids=batch.to(device))
            seen += batch.numel()
    model.train(was_training)
    return {name: torch.cat(xs)[:max_tokens] for name, xs in captured.items()}


def intermediate(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The FFN's intermediate activations act(gate x) * (up x) for x [T, D] -> [T, I]."""
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
