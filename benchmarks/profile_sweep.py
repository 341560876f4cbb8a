"""Where a sweep's time goes: `sweeplab sweep ARGS...` in this process under cProfile, its conditions one after the
other (SWEEPLAB_CONDITIONS_AT_ONCE=1, so one process does all the training), the 40 largest cumulative times
printed. The profiles behind the benchmarks page's "profiled" figures (the 1,000-trial successive-halving sweep,
the digits CNN's stacked forward). `sweeplab` ends its process without teardown, so cProfile's own command line
would lose the profile: this runs the CLI's main() and prints before returning.

Usage: python benchmarks/profile_sweep.py sweeps/digits_cnn.yaml engine=vectorized sampler=random --quiet --no-report
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

os.environ["SWEEPLAB_CONDITIONS_AT_ONCE"] = "1"

from sweeplab.cli import main  # noqa: E402


def profile(argv: list[str]) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        main(["sweep", *argv])
    finally:
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
    return out.getvalue()


if __name__ == "__main__":
    print(profile(sys.argv[1:]))
