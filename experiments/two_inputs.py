"""A model of two inputs, with items as dicts: scikit-learn's digits as an image and as its 16 row and column ink
profiles. The loader returns ({"image": [N, 1, 8, 8], "profile": [N, 16]}, labels), in memory, so the stacked
engine trains its trials together (vmap maps both inputs); the model's forward takes them by name.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def digits_two_inputs():
    digits = load_digits()
    images = (digits.images[:, None] / 16.0).astype(np.float32)
    profile = np.concatenate([images.sum(axis=3)[:, 0], images.sum(axis=2)[:, 0]], axis=1)  # 8 rows, 8 columns
    return {"image": images, "profile": profile}, digits.target


class ImageAndProfile(nn.Module):
    """A small convolution over the image and a linear layer over the profile, joined before the head."""

    def __init__(self, n_classes: int, channels: int = 8, hidden: int = 32):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.profile = nn.Sequential(nn.Linear(16, hidden), nn.ReLU())
        self.head = nn.Linear(channels * 16 + hidden, n_classes)

    def forward(self, image: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(image), self.profile(profile)], dim=1))


class TwoInputDigits(torch.utils.data.Dataset):
    """The same data as a map-style Dataset of ({"image", "profile"}, label) items, as a PyTorch user writes it
    (no `targets`, no class count): small, so sweeplab reads it into memory once and the stacked engine trains it;
    the number of classes comes from its labels. `data.class_path: two_inputs.TwoInputDigits`."""

    def __init__(self):
        inputs, self.labels = digits_two_inputs()
        self.images, self.profiles = torch.from_numpy(inputs["image"]), torch.from_numpy(inputs["profile"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"image": self.images[i], "profile": self.profiles[i]}, int(self.labels[i])
