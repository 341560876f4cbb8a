"""Lazy data through DataLoader workers, measured: (1) the peak memory of `sweeplab run` on a memory-mapped file
of 3,000 and of 300,000 rows read lazily with 2 workers, beside the same epoch as a plain PyTorch loop (random_split,
DataLoader, 2 workers: the baseline), and of the 300,000 rows read into memory, as the process
tree's peak proportional set size (PSS: resident memory with each shared page counted once), and of that the
anonymous part (the processes' own memory, not pages of mapped files); every process of the run, its DataLoader
workers included, sampled every 10 ms from /proc;
(2) seconds per epoch of the same 30,000 rows read lazily with 2 workers against in memory (the fast indexing
path), side by side, alternating.

    python benchmarks/bench_lazy.py [--rows 300000] [--epochs 1]

The data is benchmarks/rows_file.py's: digits' 64 pixels tiled to any number of rows. The README's figures come
from this script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import rows_file  # noqa: E402

EXPERIMENT = """\
name: lazy_rows
task: multiclass
data: {{source: python, class_path: rows_file.{loader}, init_args: {{folder: {folder}}}, num_workers: {workers},
        val_size: 0.1}}
model: {{hidden: 64}}
train: {{epochs: {epochs}, batch_size: 256, lr: 0.003}}
"""


def tree_pss_kb(root: int) -> tuple[int, int]:
    """The summed Pss of `root` and every process below it: each page counted once over the processes that share
    it (forked DataLoader workers share the parent's libraries; summing their RSS would count torch three times)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "0")
            parents[int(entry)] = int(ppid)
    total, anon, stack = 0, 0, [root]
    while stack:
        pid = stack.pop()
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
            total += int(fields["Pss"].split()[0])
            anon += int(fields["Pss_Anon"].split()[0])
        except (OSError, KeyError, ValueError):
            pass
        stack += [child for child, parent in parents.items() if parent == pid]
    return total, anon


def peak_rss_mb(folder: Path, loader: str, workers: int, epochs: int) -> tuple[float, float, float]:
    """(peak PSS MB, peak anonymous PSS MB of the process tree, seconds) of one `sweeplab run`."""
    experiment = folder / f"{loader}_{workers}.yaml"
    experiment.write_text(EXPERIMENT.format(loader=loader, folder=folder / "data", workers=workers, epochs=epochs))
    shutil.copy(HERE / "rows_file.py", folder / "rows_file.py")
    store = folder / f"runs_{loader}.db"
    command = [sys.executable, "-m", "sweeplab", "run", str(experiment), "--tracking-uri", f"sqlite:///{store}"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = peak_anon = 0
    while proc.poll() is None:
        pss, anon = tree_pss_kb(proc.pid)
        peak, peak_anon = max(peak, pss), max(peak_anon, anon)
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.read().decode()[-2000:])
    return peak / 1024, peak_anon / 1024, seconds


# The baseline: the same epoch as a user writes it in plain PyTorch (random_split, DataLoader, 2 workers).
PLAIN = """
import sys, torch
sys.path.insert(0, sys.argv[3])
import rows_file
from torch.utils.data import DataLoader, random_split
torch.manual_seed(0)
ds, workers, epochs = rows_file.RowFile(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
n_val = round(len(ds) * 0.1)
train, val = random_split(ds, [len(ds) - n_val, n_val], generator=torch.Generator().manual_seed(0))
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
optimizer, loss_fn = torch.optim.Adam(model.parameters(), 3e-3), torch.nn.CrossEntropyLoss()
for epoch in range(epochs):
    model.train()
    for x, y in DataLoader(train, batch_size=256, shuffle=True, num_workers=workers):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        total = sum(loss_fn(model(x), y).item() * len(y) for x, y in DataLoader(val, batch_size=256, num_workers=workers))
"""


def plain_peak_mb(folder: Path, workers: int, epochs: int) -> tuple[float, float]:
    """(peak PSS MB, peak anonymous PSS MB) of the PLAIN loop's process tree, sampled as peak_rss_mb does."""
    command = [sys.executable, "-c", PLAIN, str(folder / "data"), str(workers), str(HERE), str(epochs)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = peak_anon = 0
    while proc.poll() is None:
        pss, anon = tree_pss_kb(proc.pid)
        peak, peak_anon = max(peak, pss), max(peak_anon, anon)
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.read().decode()[-2000:])
    return peak / 1024, peak_anon / 1024


def seconds_per_epoch(folder: Path, lazy: bool, epochs: int) -> float:
    from sweeplab.config import build_experiment
    from sweeplab.train.experiment import run_experiment

    raw = {
        "task": "multiclass",
        "data": {
            "source": "python",
            "class_path": "rows_file.RowFile" if lazy else "rows_file.rows_in_memory",
            "init_args": {"folder": str(folder / "data")},
            "num_workers": 2 if lazy else 0,
            "val_size": 0.1,
        },
        "model": {"hidden": 64},
        "train": {"epochs": epochs, "batch_size": 256, "lr": 0.003},
    }
    result = run_experiment(build_experiment(raw, "bench", HERE))
    return result.history.seconds / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--small", type=int, default=3_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--speed-rows", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="sweeplab-lazy-") as tmp:
        print(f"\n(1) peak memory (PSS) of `sweeplab run`'s process tree, {args.epochs} epoch(s), batch 256, MLP 64")
        anons: dict[str, list[float]] = {"sweeplab": [], "plain": []}
        for rows in (args.small, args.rows):
            folder = Path(tmp) / str(rows)
            rows_file.write_rows(folder / "data", rows)
            size = (folder / "data" / "rows.f32").stat().st_size / 2**20
            mb, anon, seconds = peak_rss_mb(folder, "RowFile", 2, args.epochs)
            anons["sweeplab"].append(anon)
            print(
                f"  lazy, 2 workers, {rows:>7,} rows ({size:5.1f} MB file): peak {mb:5.0f} MB, anonymous {anon:5.0f} MB"
                f"  ({seconds:.1f} s)"
            )
            mb, anon = plain_peak_mb(folder, 2, args.epochs)
            anons["plain"].append(anon)
            print(f"    plain PyTorch loop, same rows:            peak {mb:5.0f} MB, anonymous {anon:5.0f} MB")
        extra = args.rows - args.small
        per_sample = {name: (big - small) * 2**20 / extra for name, (small, big) in anons.items()}
        print(
            f"  anonymous memory per extra row: sweeplab {per_sample['sweeplab']:.0f} bytes, plain PyTorch "
            f"{per_sample['plain']:.0f} bytes (ratio {per_sample['sweeplab'] / per_sample['plain']:.2f})"
        )
        mb, anon, seconds = peak_rss_mb(Path(tmp) / str(args.rows), "rows_in_memory", 0, args.epochs)
        print(
            f"  in memory,         {args.rows:>7,} rows:                peak {mb:5.0f} MB, anonymous {anon:5.0f} MB"
            f"  ({seconds:.1f} s)"
        )

        print(f"\n(2) seconds per epoch, {args.speed_rows:,} rows, alternating, {args.repeats} repeats")
        folder = Path(tmp) / "speed"
        rows_file.write_rows(folder / "data", args.speed_rows)
        sys.path.insert(0, str(HERE))
        lazy, memory = [], []
        for _ in range(args.repeats):
            memory.append(seconds_per_epoch(folder, False, 3))
            lazy.append(seconds_per_epoch(folder, True, 3))
        m, z = statistics.median(memory), statistics.median(lazy)
        print(f"  in memory (indexed tensors): {m:.3f} s/epoch")
        print(f"  lazy, 2 DataLoader workers:  {z:.3f} s/epoch   ratio {z / m:.1f}x")


if __name__ == "__main__":
    main()
