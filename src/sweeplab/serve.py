"""Turn model outputs into predictions people read: values, probabilities, labels.

(Loading a logged model by run id, sweep or models:/ URI comes with `sweeplab predict`.)
"""

from __future__ import annotations

from typing import Any

import torch

from .model import ModelSpec


def describe_outputs(outputs: torch.Tensor, spec: ModelSpec) -> list[dict[str, Any]]:
    """One dict per row: `prediction` (the value, or the label), `probability`/`probabilities` for
    classification, and `text` as `sweeplab run` prints it (regression: the seed's `pred=12.05`)."""
    if spec.task == "regression":
        return [{"prediction": float(v), "text": f"pred={float(v):.2f}"} for v in outputs[:, 0].tolist()]
    if spec.task == "binary":
        probs = torch.sigmoid(outputs[:, 0]).tolist()
        return [{"prediction": int(p > 0.5), "probability": p, "text": f"label={int(p > 0.5)} p={p:.2f}"}
                for p in probs]
    probs = torch.softmax(outputs, dim=1)
    rows = []
    for row in probs.tolist():
        label = max(range(len(row)), key=row.__getitem__)
        rows.append({"prediction": label, "probabilities": row, "text": f"label={label} p={row[label]:.2f}"})
    return rows
