"""Why the digits CNN gains little from stacking on this CPU: torch's max_pool2d (2x2) on NCHW float32 tensors of
16 channels of 8x8, one thread, at the batch of one member (64) and of three stacked (192), against channels-last.
Prints milliseconds per call (median of 5 timings of 200 calls each).

Usage: python benchmarks/measure_pooling.py
"""

from __future__ import annotations

import statistics
import time

import torch


def per_call(function, calls: int = 200) -> float:
    function()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        times.append((time.perf_counter() - started) / calls * 1000)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    for batch in (64, 128, 192, 384):
        x = torch.randn(batch, 16, 8, 8, requires_grad=True)
        last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        nchw, channels_last = (
            per_call(lambda x=x: torch.max_pool2d(x, 2)),
            per_call(lambda t=last: torch.max_pool2d(t, 2)),
        )
        print(f"batch {batch:4d}: NCHW {nchw:.3f} ms, channels-last {channels_last:.3f} ms")


if __name__ == "__main__":
    main()
