#!/usr/bin/env bash
# The prepared device check (README "Speed"): the vectorized engine's set-up and training on a GPU machine that has
# PyTorch but not this project's other packages. Carry the pydantic wheels in .whl (README of the device tool):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl pydantic pydantic_core \
#       annotated-types typing-inspection   (versions from constraints.txt)
# then run `bash benchmarks/on_gpu.sh` there; the tables land in $OUT (or ./gpu-out).
set -euo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/card.txt"
python3 benchmarks/bench_members.py cuda ${SIZES:-256 1024 4096 16384} | tee "$OUT/bench_members_cuda.txt"
# a user's model: the digits CNN stacked by torch.func (images shaped like the digits where scikit-learn is absent)
timeout ${CNN_LIMIT:-240} python3 benchmarks/bench_cnn_members.py cuda ${CNN_SIZES:-256 4096} \
    | tee "$OUT/bench_cnn_members_cuda.txt" || echo "bench_cnn_members: stopped (${CNN_LIMIT:-240} s limit)" | tee -a "$OUT/bench_cnn_members_cuda.txt"
# where the time of the largest group goes, for the next step
python3 - <<'PY' | tee "$OUT/profile_cuda.txt"
import cProfile, pstats, sys
sys.path.insert(0, "benchmarks")
from bench_members import measure
measure(1024, "cuda", share=True)  # warm
cProfile.run("setup, rate, *_ = measure(16384, 'cuda', share=True)", "/tmp/prof")
print(f"K=16384: set-up {setup:.3f} ms/member, {rate:.0f} trials/s (under the profiler)")
pstats.Stats("/tmp/prof").sort_stats("tottime").print_stats(18)
PY
