"""A small CNN for scikit-learn's 8x8 digits: the example of a user's own model (experiments/digits_cnn.yaml).

Nothing here knows sweeplab: a plain nn.Module. sweeplab fills `in_channels` and `n_classes` from the data (the
digits arrive as [N, 1, 8, 8] images, 10 classes); `channels` and `dropout` come from the experiment file or the
sweep's space.
"""

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, n_classes: int = 10, channels: int = 16, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),  # 8x8
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels * 2 * 2, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
