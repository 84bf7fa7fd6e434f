"""An exponential moving average of a model's weights (TrainConfig.ema), for validation, the saved model and its
samples: BD3-LM evaluates with an average of decay 0.9999.

The average is kept in float32 whatever the model's dtype: a bf16 embedding moved by (1 - decay) of a small
difference would not change at all in bf16. `applied(model)` puts the average into the model for a while (cast
to each parameter's dtype) and puts the trained weights back after, bit for bit.
"""
from __future__ import annotations

import contextlib

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.weights = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """average <- decay · average + (1 - decay) · weights, after an optimizer step."""
        current = [p.detach().float() for _, p in model.named_parameters()]
        torch._foreach_lerp_(list(self.weights.values()), current, 1 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, model: torch.nn.Module):
        """The model holds the average inside the block, its own weights again after it."""
        params = dict(model.named_parameters())
        trained = {name: p.detach().clone() for name, p in params.items()}
        for name, p in params.items():
            p.copy_(self.weights[name])
        try:
            yield model
        finally:
            for name, p in params.items():
                p.copy_(trained[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        if weights.keys() != self.weights.keys():
            raise ValueError("the average's parameters are not this model's")
        for name, w in weights.items():
            self.weights[name].copy_(w)
