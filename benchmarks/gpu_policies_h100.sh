#!/usr/bin/env bash
# One device call: versions, GPU tests, then policies on an OLMoE-geometry model
# driven by demo-model routing (decode-only metrics), 10/25/50% cached, batch 1 and 8 ($POLICIES), and token
# scheduling at batch 4-32.
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
T=benchmarks/traces
M=/dev/shm/olmoe
mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
(timeout 120 python3 -m moeflow synth --like olmoe --out $M > "$OUT/synth.log" 2>&1; echo "synth rc $?" >> "$OUT/synth.log") &
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py tests/experts/test_store.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -4
wait
tail -2 "$OUT/synth.log"
mkdir -p $M/moeflow && cp models/demo/moeflow/eamc.npz models/demo/moeflow/predictor.pt $M/moeflow/
POLICIES=${POLICIES:-lru,expertflow}
timeout 300 python3 benchmarks/policy_decode.py --model $M --trace $T/demo-eval.npz --requests 8 \
  --max-prompt 64 --max-tokens 32 --policies $POLICIES --fractions 0.25,0.1,0.5 --batches 1,8 \
  --out "$OUT/policy-decode-olmoe-h100.json" 2>&1 | cut -c1-200 | tail -13
timeout 200 python3 benchmarks/sched_throughput.py --model $M --trace $T/demo-eval.npz --requests 32 --tokens 16 \
  --max-prompt 64 --batches 4,8,16,32 --policies lru,expertflow --out "$OUT/sched-throughput-h100.json" 2>&1 | tail -16
