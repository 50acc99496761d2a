#!/usr/bin/env bash
# Issue 13's device checks as one script, for a session that is lent a GPU.
#
#   bash ../shared/gpu/stage.sh                        # here: wheels + data into .gpu/
#   device run, carry [".gpu"]:  source .gpu/boot.sh && bash bench/gpu_checks.sh
#
# About 10 minutes on an H100 at the full sizes. Everything lands under $OUT (default
# $OUT of the device tool, else docs/bench/gpu). Each bench writes ratios against a
# baseline measured in the same run:
#   1. bench_train.py, noisescore_cnn and resnet18, 28 px, batch 128: captured step vs
#      eager, LiNC warm-up / CE, Trainer / textbook DataLoader (targets: >= 100 k and
#      >= 30 k samples/s, LiNC/CE <= 1.02, Trainer >= 4x DataLoader);
#   2. bench_stream.py, 100k synthetic 224 px images streamed from pinned host memory:
#      samples/s and the compute share of the step time (target >= 0.8);
#   3. the CUDA-only tests (captured vs eager training, the pinned double buffer).
# DEVICE=cpu QUICK=1 DATASET=breastmnist runs the same steps at toy sizes on a CPU (that
# is how this script is checked without a GPU).
set -euo pipefail
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DATASET=${DATASET:-pneumoniamnist}
DATA=${DATA:-.gpu/data}
OUT=${OUT:-docs/bench/gpu}
if [ "${QUICK:-0}" = 1 ]; then
  EPOCHS=1 REPEATS=1 SAMPLES=2048 SIZE=32 WARM=4 STEPS=4 MODELS="noisescore_cnn"
else
  EPOCHS=3 REPEATS=3 SAMPLES=100000 SIZE=224 WARM=20 STEPS=200 MODELS="noisescore_cnn resnet18"
fi
mkdir -p "$OUT"
{ echo "device: $DEVICE"; "$PY" -c "import torch; print('torch', torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"; } | tee "$OUT/device.txt"

for model in $MODELS; do
  "$PY" bench/bench_train.py --dataset "$DATASET" --data-dir "$DATA" --device "$DEVICE" \
    --model "$model" --epochs "$EPOCHS" --repeats "$REPEATS" --out-dir "$OUT/train_$model"
done

"$PY" bench/bench_stream.py --samples "$SAMPLES" --image-size "$SIZE" --model resnet18 \
  --warmup-steps "$WARM" --steps "$STEPS" --repeats "$REPEATS" --device "$DEVICE" --out-dir "$OUT/stream"

if "$PY" -c "import pytest" 2>/dev/null; then
  # On CPU these are skipped with their reason; on CUDA they must pass.
  "$PY" -m pytest -q -rs tests/test_step_graph.py tests/test_streaming.py \
    -k "cuda or captured" 2>&1 | tee "$OUT/cuda_tests.txt"
fi
echo "done: $OUT"
