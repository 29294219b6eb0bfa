#!/usr/bin/env bash
# Device calls for the static / CUDA-graph decode (each fits one 600 s call):
#   bash benchmarks/gpu_decode_h200.sh tests   # GPU tests (graph path, kernel, eager path) + OLMoE synth + smoke
#   bash benchmarks/gpu_decode_h200.sh floor   # benchmarks/decode_floor.py: OLMoE geometry, demo routing replayed,
#                                              # LRU / ExpertFlow / MoE-Infinity at 10/25/50%, batch 1 and 8
#   bash benchmarks/gpu_decode_h200.sh resident # GPU tests, then benchmarks/resident_step.py (compiled step or not,
#                                              # replay vs host time, kernels per replay; TTFT vs transformers)
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
M=/dev/shm/olmoe
T=benchmarks/traces
STAGE=${1:-tests}
mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
synth() {
  if [ ! -f $M/config.json ]; then
    rm -rf $M; timeout 200 python3 -m moeflow synth --like olmoe --out $M > "$OUT/synth.log" 2>&1; echo "synth rc $?" >> "$OUT/synth.log"
  fi
  mkdir -p $M/moeflow && cp models/demo/moeflow/eamc.npz models/demo/moeflow/predictor.pt $M/moeflow/
}
if [ "$STAGE" = tests ]; then
  synth &
  timeout 330 python3 -m pytest -q -p no:cacheprovider -rf tests/engine/test_static_gpu.py tests/test_engine_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | grep -v Warning | tail -40
  wait; tail -2 "$OUT/synth.log"
  timeout 150 python3 benchmarks/decode_floor.py --model $M --trace $T/demo-eval.npz --fractions 0.25 --batches 1,8 \
    --policies lru --requests 4 --max-tokens 16 --out "$OUT/decode-floor-smoke.json" 2>&1 | grep -v Warn | cut -c1-220 | tail -30
elif [ "$STAGE" = resident ]; then
  synth &
  timeout 320 python3 -m pytest -q -p no:cacheprovider -rf tests/engine/test_static_gpu.py tests/engine/test_static_memory_gpu.py \
    tests/test_engine_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | grep -v Warning | tail -30
  wait; tail -2 "$OUT/synth.log"
  timeout 230 python3 benchmarks/resident_step.py --model $M --trace $T/demo-eval.npz --out "$OUT/resident-step-h200.json" \
    2>&1 | grep -v Warn | cut -c1-300 | tail -30
elif [ "$STAGE" = memfloor ]; then  # peak-memory tests, the compiled resident step and TTFT, the full floor run
  synth &
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rf tests/engine/test_static_memory_gpu.py 2>&1 | tee "$OUT/gpu-memory-tests.log" | tail -5
  wait; tail -2 "$OUT/synth.log"
  timeout 140 python3 benchmarks/resident_step.py --model $M --trace $T/demo-eval.npz --modes compiled --out "$OUT/resident-step-h200.json" \
    2>&1 | grep -v Warn | cut -c1-300 | tail -8
  timeout 290 python3 benchmarks/decode_floor.py --model $M --trace $T/demo-eval.npz --no-kernel-stage --out "$OUT/decode-floor-h200.json" \
    2>&1 | grep -v Warn | cut -c1-240 | tail -30
elif [ "$STAGE" = mixtral ]; then  # Mixtral geometry (first 8 layers), the real Mixtral trace replayed, batch 1
  X=/dev/shm/mixtral8
  timeout 200 python3 -m moeflow synth --like mixtral --layers 8 --out $X > "$OUT/synth-mixtral.log" 2>&1; tail -1 "$OUT/synth-mixtral.log"
  timeout 330 python3 benchmarks/decode_floor.py --model $X --trace .data/traces/mixtral.npz --geometry mixtral-8-layers \
    --batches 1 --requests 2 --max-tokens 48 --max-prompt 1 --no-kernel-stage --out "$OUT/decode-floor-mixtral-h200.json" \
    2>&1 | grep -v Warn | cut -c1-240 | tail -20
elif [ "$STAGE" = floor ]; then
  synth
  timeout 480 python3 benchmarks/decode_floor.py --model $M --trace $T/demo-eval.npz --out "$OUT/decode-floor-h200.json" \
    2>&1 | grep -v Warn | cut -c1-240 | tail -40
fi
