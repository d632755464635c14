#!/usr/bin/env bash
# The GPU checks in one go, for a machine that has torch + transformers but nothing else of
# ours installed (no network): the CUDA-only tests, then the Llama-3-8B-shaped speed benchmark.
#   OUT=/some/dir bash benchmarks/run_gpu.sh
# Writes $OUT/speed_gpu_llama3-8b.json, $OUT/tests.log and $OUT/speed.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 GQAPRUNE_CACHE=${TMPDIR:-/tmp}/gqaprune-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/speed.log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__)" | tee -a "$OUT/speed.log"
# CUDA-only tests (skipped on CPU machines) and the GPU-relevant pieces of the suite
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_checkpoint.py tests/test_recovery.py \
    tests/test_evaluate.py -k "cuda or chunked or batch" 2>&1 | tail -n 15 | tee "$OUT/tests.log"
timeout 420 python3 benchmarks/speed.py --shape llama3-8b --random-weights \
    --removal-batch-size 32 --out "$OUT/speed_gpu_llama3-8b.json" 2>&1 | tee -a "$OUT/speed.log"
# Layer-wise pruning (issue 14), default preset, 32 x 256 calibration tokens on pydoc: the
# Llama-3-8B shape whole (peak CUDA memory, seconds), then 4 layers of the 70B shape (seconds
# per layer, extrapolated to 80 layers in the JSON). Random bf16 weights drawn on the GPU and
# written to $LW (8B: 16 GB, 70B x 4 layers: 11 GB on disk), removed afterwards.
LW=${TMPDIR:-/tmp}/gqaprune-lw
for run in "llama3-8b" "llama-70b --layers 4"; do
    timeout 240 python3 benchmarks/layerwise_bench.py --shape $run --device cuda \
        --paths layerwise --windows 32 --seq-len 256 --calibration pydoc --workdir "$LW" \
        --out "$OUT/layerwise_cuda_${run%% *}.json" 2>&1 | tail -n 4 | tee -a "$OUT/layerwise.log"
    rm -rf "$LW"
done
