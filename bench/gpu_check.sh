#!/usr/bin/env bash
# The GPU checks of issue 8 (item 5), as one script for a session that is lent a GPU (device tool).
# Never run yet: no GPU has been lent to this project so far. Budget: a few minutes on one GPU.
#
#   bash bench/gpu_check.sh [OUT]      (from the repository root; OUT defaults to ${OUT:-/tmp/gpu-check})
#
# 1. the CUDA-only tests; 2. crop with batching vs the plain MTCNN loop on the same GPU (target >= 10x);
# 3. training images/s with bf16 autocast + channels_last, and predict from raw photos.
set -euo pipefail
OUT=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  | tee "$OUT/device.txt"
timeout 120 python -m pytest -q tests/test_detector.py -k gpu 2>&1 | tail -3 | tee "$OUT/tests.txt"
timeout 300 python bench/crop.py --device cuda --photos 2001 --repeat 1 --workdir "$OUT/crop" 2>&1 | tail -5 \
  | tee "$OUT/crop.txt"
timeout 240 python bench/throughput.py --device cuda --amp --steps 20 --batch 128 --workdir "$OUT/thr" 2>&1 \
  | tail -6 | tee "$OUT/throughput.txt"
