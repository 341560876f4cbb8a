"""A second, plain implementation to check sweeplab against: the seed's script, parametrised.

This is the seed's code (DataLoader, random_split, .item() per batch, copy.deepcopy) with only the knobs the
exercises turn made into arguments. It shares no code with sweeplab.
"""

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

SEED_EXPECTED_OUTPUT = """\
training_loop_lab
epoch=  1 train_loss=34.8472 val_loss=25.3358
epoch= 20 train_loss=0.1022 val_loss=0.0856
epoch= 40 train_loss=0.0950 val_loss=0.0776
epoch= 60 train_loss=0.0972 val_loss=0.0760
epoch= 80 train_loss=0.0936 val_loss=0.0776
best_val: 0.0734
predictions:
x=[1.0, 2.0] -> pred=12.05
x=[-1.0, 0.5] -> pred=3.00
x=[0.0, 0.0] -> pred=4.98
"""


def seed_run(optimizer="Adam", lr=0.03, hidden=16, noise=0.3, epochs=80, dropout=0.0, binary=False):
    torch.manual_seed(42)
    X = torch.randn(240, 2)
    eps = torch.randn(240, 1) * noise
    y = 3 * X[:, [0]] + 2 * X[:, [1]] + 5 + eps
    if binary:
        y = (y > 5).float()
    dataset = TensorDataset(X, y)
    train_dataset, val_dataset = random_split(dataset, [192, 48], generator=torch.Generator().manual_seed(42))
    train_loader = DataLoader(train_dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(7))
    val_loader = DataLoader(val_dataset, batch_size=48, shuffle=False)
    layers = [nn.Linear(2, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(hidden, 1)]

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*layers)

        def forward(self, x):
            return self.net(x)

    model = Regressor()
    loss_fn = nn.BCEWithLogitsLoss() if binary else nn.MSELoss()
    opt = getattr(torch.optim, optimizer)(model.parameters(), lr=lr)

    def run_epoch(loader, train):
        model.train() if train else model.eval()
        total_loss = 0.0
        with torch.enable_grad() if train else torch.no_grad():
            for batch_x, batch_y in loader:
                pred = model(batch_x)
                loss = loss_fn(pred, batch_y)
                if train:
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                total_loss += loss.item() * len(batch_x)
        return total_loss / len(loader.dataset)

    best_val, best_state, best_epoch = float("inf"), None, 0
    train_curve, val_curve = [], []
    for epoch in range(1, epochs + 1):
        train_curve.append(run_epoch(train_loader, True))
        val_curve.append(run_epoch(val_loader, False))
        if val_curve[-1] < best_val:
            best_val, best_epoch = val_curve[-1], epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        preds = model(torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]]))[:, 0].tolist()
    return {
        "train_loss": train_curve,
        "val_loss": val_curve,
        "best_val": best_val,
        "best_epoch": best_epoch,
        "predictions": preds,
        "best_state": best_state,
    }
