"""An exponential moving average of the generator's weights, used for everything that renders faces.

GAN generators trained with a high learning rate wander around a good solution; the average of their recent weights
sits closer to it and renders cleaner faces (Karras et al. use it in every StyleGAN). A deviation from the paper
(``train.ema_decay``, 0 = off): training still updates the live networks; samples, the tune objective and the model
bundle use the averaged ones. BatchNorm statistics are copied from the live networks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.averaged = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in modules.items()}
        self.started = False  # the first update copies: the random initial weights are never averaged in

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module]) -> None:
        for name, live in modules.items():
            average = self.averaged[name]
            if not self.started:
                average.load_state_dict(live.state_dict())
                continue
            for a, p in zip(average.parameters(), live.parameters(), strict=True):
                a.lerp_(p.detach(), 1 - self.decay)
            for a, b in zip(average.buffers(), live.buffers(), strict=True):
                a.copy_(b)
        self.started = True

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started, "networks": {name: m.state_dict() for name, m in self.averaged.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started = bool(state["started"])
        for name, weights in state["networks"].items():
            self.averaged[name].load_state_dict(weights)
