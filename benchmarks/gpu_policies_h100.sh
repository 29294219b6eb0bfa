#!/usr/bin/env bash
# Device calls for the policy results (each fits one 600 s call):
#   bash benchmarks/gpu_policies_h100.sh policies  # GPU tests; OLMoE geometry driven by demo-model routing,
#                                                  # 10/25/50% cached, batch 1 and 8
#   bash benchmarks/gpu_policies_h100.sh sched     # policies on the demo model itself (25/10%); token scheduling
#                                                  # on/off at batch 4-32, LRU and ExpertFlow
#   bash benchmarks/gpu_policies_h100.sh attrib    # batch 1: LRU, ExpertFlow, ExpertFlow without prefetching
#   bash benchmarks/gpu_policies_h100.sh profile   # cProfile of decode per policy (OLMoE geometry, 25%, batch 1)
#   bash benchmarks/gpu_policies_h100.sh mixtral   # Mixtral-8x7B geometry (first 8 layers) driven by the real
#                                                  # Mixtral routing trace (carry .data/traces/mixtral.npz)
# Metrics are decode-only (prefill excluded); prompts are cut to 64 tokens, the rest replayed as decode steps.
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
T=benchmarks/traces
M=/dev/shm/olmoe
STAGE=${1:-policies}
mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
if [ "$STAGE" = mixtral ]; then
  X=/dev/shm/mixtral8
  rm -rf $X; time timeout 200 python3 -m moeflow synth --like mixtral --layers 8 --out $X 2>&1 | tail -1
  timeout 360 python3 benchmarks/policy_decode.py --model $X --trace .data/traces/mixtral.npz --requests 2 \
    --policies lru,expertflow,moe-infinity --fractions 0.25,0.5 --batches 1,2 \
    --out "$OUT/policy-decode-mixtral-h100.json" 2>&1 | grep -v Warn | cut -c1-150 | tail -12
  exit 0
fi
(timeout 120 python3 -m moeflow synth --like olmoe --out $M > "$OUT/synth.log" 2>&1; echo "synth rc $?" >> "$OUT/synth.log") &
if [ "$STAGE" = policies ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py tests/experts/test_store.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -3
fi
wait
tail -1 "$OUT/synth.log"
mkdir -p $M/moeflow && cp models/demo/moeflow/eamc.npz models/demo/moeflow/predictor.pt $M/moeflow/
if [ "$STAGE" = policies ]; then
  timeout 360 python3 benchmarks/policy_decode.py --model $M --trace $T/demo-eval.npz --requests 8 \
    --max-prompt 64 --max-tokens 32 --policies lru,expertflow,moe-infinity --fractions 0.25,0.1,0.5 --batches 1,8 \
    --out "$OUT/policy-decode-olmoe-h100.json" 2>&1 | cut -c1-150 | tail -18
elif [ "$STAGE" = attrib ]; then  # batch 1, 25%: where ExpertFlow's extra time goes (with and without prefetch)
  timeout 150 python3 benchmarks/policy_decode.py --model $M --trace $T/demo-eval.npz --requests 8 --max-prompt 64 \
    --max-tokens 32 --policies lru,expertflow --fractions 0.25 --batches 1 --out "$OUT/attrib-default.json" 2>&1 | cut -c1-120 | tail -2
  timeout 100 python3 benchmarks/policy_decode.py --model $M --trace $T/demo-eval.npz --requests 8 --max-prompt 64 \
    --max-tokens 32 --policies expertflow --fractions 0.25 --batches 1 --option max_lookahead=0 \
    --out "$OUT/attrib-no-prefetch.json" 2>&1 | cut -c1-120 | tail -1
elif [ "$STAGE" = profile ]; then
  timeout 300 python3 benchmarks/profile_decode.py --model $M --trace $T/demo-eval.npz \
    --out "$OUT/profile-decode-h100.json" 2>&1 | tail -120
else  # the demo model first, with nothing else running on the host
  timeout 100 python3 benchmarks/policy_decode.py --model models/demo --trace $T/demo-eval.npz --requests 8 \
    --max-prompt 64 --max-tokens 32 --policies lru,moe-infinity,expertflow --fractions 0.25,0.1 --batches 1,8 \
    --out "$OUT/policy-decode-demo-h100.json" 2>&1 | cut -c1-150 | tail -12
  timeout 420 python3 benchmarks/sched_throughput.py --model $M --trace $T/demo-eval.npz --requests 32 --tokens 16 \
    --max-prompt 64 --batches 16,4,8,32 --policies expertflow,lru --out "$OUT/sched-throughput-h100.json" 2>&1 | cut -c1-220 | tail -16
fi
