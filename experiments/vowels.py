"""Japanese vowels: a GRU over variable-length sequences, with its own collate_fn and a forward of two arguments.

The data (experiments/data/japanese_vowels.npz) is the UCI "Japanese Vowels" set (M. Kudo, J. Toyama and
M. Shimbo, 1999) as the UEA & UCR time-series archive distributes it: 9 speakers saying "ae", 12 LPC cepstrum
coefficients per frame, 7 to 29 frames per utterance; 270 training and 370 test utterances. The task is the speaker.

`utterances()` is the loader (the archive's own split), `pad_batch` the collate_fn, `VowelGRU` the model. It is
what one would write for plain PyTorch; experiments/japanese_vowels.yaml names the three.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

DATA = Path(__file__).parent / "data" / "japanese_vowels.npz"


class Utterances(torch.utils.data.Dataset):
    """(frames [T, 12] float32, speaker) items, T from 7 to 29."""

    def __init__(self, values: np.ndarray, lengths: np.ndarray, labels: np.ndarray):
        self.values = torch.from_numpy(values)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.targets = torch.from_numpy(labels)  # the labels without reading the items (torchvision's convention)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.values[self.starts[i] : self.starts[i + 1]], self.targets[i]


def utterances() -> dict:
    data = np.load(DATA)
    return {
        part: Utterances(data[f"{split}_values"], data[f"{split}_lengths"], data[f"{split}_labels"])
        for part, split in (("train", "train"), ("val", "test"))
    }


def pad_batch(items):
    """Utterances of different lengths padded to the longest: ((padded_x [B, T, 12], lengths [B]), speakers [B])."""
    frames = [x for x, _ in items]
    lengths = torch.tensor([len(x) for x in frames])
    return (pad_sequence(frames, batch_first=True), lengths), torch.stack([torch.as_tensor(y) for _, y in items])


class VowelGRU(nn.Module):
    """A GRU that reads each utterance up to its own length (a packed sequence), then a linear head on the last
    hidden state."""

    def __init__(self, n_classes: int, n_features: int = 12, hidden: int = 32, layers: int = 1):
        super().__init__()
        self.gru = nn.GRU(n_features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, padded_x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(padded_x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, hidden = self.gru(packed)
        return self.head(hidden[-1])
