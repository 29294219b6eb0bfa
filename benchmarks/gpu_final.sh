#!/usr/bin/env bash
# One device call: OLMoE-geometry synth in RAM, core decode benchmark, policies on demo routing, token scheduling.
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
T=benchmarks/traces
M=/dev/shm/olmoe
mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
time timeout 120 python3 -m moeflow synth --like olmoe --out $M 2>&1 | tail -1
mkdir -p $M/moeflow && cp $T/eamc-demo-train.npz $M/moeflow/eamc.npz && cp $T/predictor-demo.pt $M/moeflow/predictor.pt
timeout 140 python3 benchmarks/olmoe_decode.py --model $M --tokens 48 --e2e-backends triton,batched \
  --out "$OUT/olmoe-decode-h100.json" 2>&1 | grep -v '^ ' | tail -4
timeout 220 python3 benchmarks/policy_decode.py --model $M --trace $T/demo-eval.npz --requests 6 \
  --policies lru,moe-infinity,expertflow --fractions 0.1,0.25,0.5 --batches 1,8 --out "$OUT/policy-decode-h100.json" 2>&1 | tail -20
timeout 130 python3 benchmarks/sched_throughput.py --model $M --trace $T/demo-eval.npz --requests 48 --tokens 24 \
  --out "$OUT/sched-throughput-h100.json" 2>&1 | tail -10
timeout 60 python3 benchmarks/policy_decode.py --model models/demo --trace $T/demo-eval.npz --requests 4 \
  --policies lru,moe-infinity,expertflow --fractions 0.25 --batches 1 --option eamc=$T/eamc-demo-train.npz \
  --option predictor=$T/predictor-demo.pt --out "$OUT/policy-decode-demo-h100.json" 2>&1 | tail -4
