"""A user's memory-mapped data set: rows of 64 float32 features in one binary file and their labels in another,
read row by row (or a batch of rows at once, `__getitems__`, which DataLoader uses when a Dataset has it) through
a memory map opened for that read and closed after it: nothing stays mapped, so a process's memory does not grow
with the file. `write_rows` makes such files from scikit-learn's digits (each image's 64 pixels, tiled with a
little jitter to any number of rows). Used by benchmarks/bench_lazy.py and tests/test_batches.py.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

FEATURES = 64


def write_rows(folder: str | Path, n_rows: int, seed: int = 0) -> Path:
    """folder/rows.f32 ([n_rows, 64] float32) and folder/labels.npy ([n_rows] int64), written in chunks."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    pixels, target = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    labels = np.empty(n_rows, dtype=np.int64)
    with open(folder / "rows.f32", "wb") as out:
        for start in range(0, n_rows, 50_000):
            n = min(50_000, n_rows - start)
            pick = rng.integers(0, len(target), n)
            jitter = rng.normal(0, 0.05, (n, FEATURES)).astype(np.float32)
            out.write((pixels[pick] + jitter).astype(np.float32).tobytes())
            labels[start : start + n] = target[pick]
    np.save(folder / "labels.npy", labels)
    return folder


class RowFile(torch.utils.data.Dataset):
    """(features [64] float32, label) items of the files `write_rows` makes, never read whole."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.n = (self.folder / "rows.f32").stat().st_size // (4 * FEATURES)
        self.targets = np.load(self.folder / "labels.npy", mmap_mode="r")  # labels, without reading the rows

    def __len__(self) -> int:
        return self.n

    def _rows(self, indices) -> np.ndarray:
        with open(self.folder / "rows.f32", "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            rows = np.frombuffer(mm, dtype=np.float32).reshape(self.n, FEATURES)
            try:
                return rows[np.asarray(indices)]  # fancy indexing copies: the map can close
            finally:
                del rows  # no view may outlive the map (mmap.close refuses while one exists)

    def __getitem__(self, i: int):
        return torch.from_numpy(self._rows([i])[0]), int(self.targets[i])

    def __getitems__(self, indices: list[int]):
        rows = self._rows(indices)
        return [(torch.from_numpy(row), int(self.targets[i])) for row, i in zip(rows, indices)]


def rows_in_memory(folder: str):
    """The same rows read whole into memory, as (X, y): the in-memory path, for comparison."""
    rows = np.fromfile(Path(folder) / "rows.f32", dtype=np.float32).reshape(-1, FEATURES)
    return rows, np.load(Path(folder) / "labels.npy")
