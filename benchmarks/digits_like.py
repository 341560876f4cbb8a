"""Images shaped like scikit-learn's digits ([N, 1, 8, 8], 10 classes) for machines without scikit-learn (the
lent GPU machine): a fixed template per class plus noise, so a CNN has something to learn. Timing only."""

import torch


def digits_like(n: int = 1797, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 1, 8, 8, generator=generator) * 16
    y = torch.randint(0, 10, (n,), generator=generator)
    x = templates[y] + 4 * torch.randn(n, 1, 8, 8, generator=generator)
    return x, y
