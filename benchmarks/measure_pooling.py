"""What max_pool2d costs the digits CNN, stacked or not: torch's max_pool2d (2x2) on NCHW float32 tensors of 16
channels of 8x8 after a ReLU, one thread, by batch (64 is one member's, 192 three stacked), in microseconds per
item (median of 5 timings of 200 calls each).

Two ways of timing it, which disagree: calling it again and again on the same tensor, and cycling through 16
distinct tensors, as training does (every batch is new data). The kernel branches on the data (`val > maxval`);
on the same tensor the CPU's branch predictor learns the pattern while it is small enough (up to a batch of about
64 here), so the first way makes a batch of 64 look 2-3x cheaper per item than a stacked batch. On new data the
cost per item is the same at every batch: stacking neither gains nor loses there. Channels-last is printed too:
faster, but another memory format is another summation order in the convolutions, not the reference's numbers.

Usage: python benchmarks/measure_pooling.py
"""

from __future__ import annotations

import itertools
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


def pool(x: torch.Tensor) -> torch.Tensor:
    return torch.max_pool2d(x, 2)


def main() -> None:
    torch.set_num_threads(1)
    for batch in (64, 72, 128, 192, 384):
        inputs = [torch.relu(torch.randn(batch, 16, 8, 8)).requires_grad_() for _ in range(16)]
        cycle = itertools.cycle(inputs)
        same = per_call(lambda x=inputs[0]: pool(x)) / batch * 1000
        new = per_call(lambda c=cycle: pool(next(c))) / batch * 1000
        last = inputs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        channels_last = per_call(lambda t=last: pool(t)) / batch * 1000
        print(
            f"batch {batch:4d}: the same tensor {same:.2f} us an item, new tensors {new:.2f} us an item "
            f"(channels-last, the same tensor: {channels_last:.2f})"
        )


if __name__ == "__main__":
    main()
