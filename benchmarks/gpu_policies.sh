#!/usr/bin/env bash
# Short device call: policies at 25% cache on demo routing (OLMoE geometry), and token scheduling at batch 8/16.
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
T=benchmarks/traces
M=/dev/shm/olmoe
mkdir -p "$OUT"
timeout 80 python3 -m moeflow synth --like olmoe --out $M 2>&1 | tail -1
mkdir -p $M/moeflow && cp $T/eamc-demo-train.npz $M/moeflow/eamc.npz && cp $T/predictor-demo.pt $M/moeflow/predictor.pt
timeout 180 python3 benchmarks/policy_decode.py --model $M --trace $T/demo-eval.npz --requests 5 \
  --policies lru,moe-infinity,expertflow --fractions 0.25 --batches 8,1 --out "$OUT/policy-decode-h100.json" 2>&1 | tail -8
timeout 90 python3 benchmarks/sched_throughput.py --model $M --trace $T/demo-eval.npz --requests 32 --tokens 16 \
  --batches 16,8 --out "$OUT/sched-throughput-h100.json" 2>&1 | tail -5
