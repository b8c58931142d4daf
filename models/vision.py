"""Small image classifiers for the federated vision workloads (FedAvg paper's models, sized for CPU).

    CNN  (McMahan et al., 2017, "CNN" shrunk): [conv 5×5 → ReLU → max-pool 2] × 2 → linear → ReLU → linear
    MLP  (McMahan et al., 2017, "2NN"): flatten → [linear → ReLU] × 2 → linear

Both take features of a fixed shape: the CNN (channels, height, width) or (height, width) images, the MLP
any shape (flattened).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class CNN(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int] = (8, 16), hidden: int = 64):
        super().__init__()
        if len(in_shape) == 2:
            in_shape = (1, *in_shape)
        if len(in_shape) != 3 or min(in_shape[1:]) < 12:
            raise ValueError(f"the CNN takes (channels, height, width) or (height, width) images of at least 12×12, got features of shape {in_shape}")
        c, h, w = in_shape
        self.in_shape = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, channels[0], 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(channels[1] * (h // 4) * (w // 4), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] for features [B, *in_shape] (a missing channel axis is added)."""
        return self.head(self.features(x.reshape(len(x), *self.in_shape)))


class MLP(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 200):
        super().__init__()
        d = math.prod(in_shape)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


VISION_MODELS = {"cnn": CNN, "mlp": MLP}
