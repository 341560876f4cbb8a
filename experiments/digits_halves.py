"""Half of scikit-learn's digits at a time: the fine-tuning example's data (experiments/digits_pretrain.yaml, then
experiments/digits_finetune.yaml). `digits(low, high)` gives the 8x8 images of the digits low..high as [N, 1, 8, 8]
float32 and their labels as 0..high-low (a model for 5..9 answers 0..4; `data.classes` in the experiment names them
"5".."9")."""

import numpy as np
from sklearn.datasets import load_digits


def digits(low: int = 0, high: int = 4):
    bunch = load_digits()
    keep = (bunch.target >= low) & (bunch.target <= high)
    x = bunch.images[keep].astype(np.float32)[:, None]
    return x, (bunch.target[keep] - low).astype(np.int64)
