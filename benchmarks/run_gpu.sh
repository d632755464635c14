#!/usr/bin/env bash
# The GPU checks in one go, for a machine that has torch + transformers but nothing else of
# ours installed (no network). Steps (all by default; STEPS="tests layerwise" picks some):
#   tests        the CUDA-only tests (tests/test_cuda.py and the CUDA cases elsewhere)
#   layerwise    Llama-3-8B shape: layer-wise pruning (peak GPU memory, seconds) and the
#                sensitivity profile of the optimized preset in memory (seconds, peak memory)
#   layerwise70  4 layers of the Llama-70B shape layer-wise, seconds per layer extrapolated
#   speed        the Llama-3-8B-shaped stage timings (benchmarks/speed.py, ~7 minutes)
#   OUT=/some/dir STEPS="tests layerwise layerwise70" bash benchmarks/run_gpu.sh
# Writes to $OUT: speed.log, tests.log, layerwise.log, layerwise_cuda_*.json,
# speed_gpu_llama3-8b.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-tests layerwise layerwise70 speed}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 GQAPRUNE_CACHE=${TMPDIR:-/tmp}/gqaprune-cache
has() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/speed.log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__)" | tee -a "$OUT/speed.log"
if has tests; then
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        tests/test_checkpoint.py tests/test_recovery.py tests/test_evaluate.py \
        -k "cuda or gpu or chunked or batch" 2>&1 | tail -n 15 | tee "$OUT/tests.log"
fi
# Layer-wise pruning (issue 14), default preset, 32 x 256 calibration tokens on pydoc, random
# bf16 weights drawn on the GPU and written to $LW (8B: 16 GB, 70B x 4 layers: 11 GB on disk),
# removed afterwards. The 8B model also gets its sensitivity profile (issue 16) in memory.
LW=${TMPDIR:-/tmp}/gqaprune-lw
bench() {  # name, outer timeout, arguments...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 benchmarks/layerwise_bench.py "$@" --device cuda --windows 32 \
        --seq-len 256 --calibration pydoc --workdir "$LW" --timeout "$limit" \
        --out "$OUT/layerwise_cuda_$name.json" 2>&1 | tee -a "$OUT/layerwise.log"
    rm -rf "$LW"
}
has layerwise && bench llama3-8b 330 --shape llama3-8b --paths layerwise,sensitivity
has layerwise70 && bench llama-70b 200 --shape llama-70b --layers 4 --paths layerwise
if has speed; then
    timeout 420 python3 benchmarks/speed.py --shape llama3-8b --random-weights \
        --removal-batch-size 32 --out "$OUT/speed_gpu_llama3-8b.json" 2>&1 | tee -a "$OUT/speed.log"
fi
exit 0
