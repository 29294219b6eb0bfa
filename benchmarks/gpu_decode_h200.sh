#!/usr/bin/env bash
# Device calls for the static / CUDA-graph decode (each fits one 600 s call; pass MOEFLOW_COMMIT=<sha>):
#   bash benchmarks/gpu_decode_h200.sh floor      # benchmarks/decode_floor.py (kernel stage: tile options over every
#       # layer, then each batch size runs its fastest; LRU / ExpertFlow / MoE-Infinity at 10/25/50%, batch 1 and 8,
#       # demo routing replayed), then benchmarks/resident_step.py with the chosen tiles (compiled step, replay vs
#       # host time, kernels per replay; TTFT of a 512-token prompt against transformers)
#   bash benchmarks/gpu_decode_h200.sh buildtests # the peers' build phase (benchmarks/peers/run_h200.sh build) on
#       # cores 0-11 while the GPU tests run on cores 12-15 (correctness and peak memory only: nothing timed there)
#   bash benchmarks/gpu_decode_h200.sh tests      # the GPU tests alone
#   bash benchmarks/gpu_decode_h200.sh mixtral    # Mixtral geometry (first 8 layers), the real Mixtral trace, batch 1
#   bash benchmarks/gpu_decode_h200.sh quant      # quantised experts (issue 14): bf16 / int4 / fp8 rows at 10% and 25%,
#       # batch 1 and 8, LRU and ExpertFlow, in decode-floor-quant-h200.json (rows carry expert_dtype); int4 and fp8
#       # first get a kernel stage of the quantised kernel (benchmarks/kernel_tiles.py QUANT_VARIANTS, 5 tile options;
#       # bf16 keeps slot_kernel.BLOCKS, the floor stage's choice); load_s_by_dtype: engine build (GPU quant fit incl.)
#       # Time estimate, from the floor stage (decode-floor-h200.json: a bf16 load, a 9-option kernel stage and 20 runs
#       # in ~360 s, i.e. ~15 s a run with its warm-up and graph captures, 2-8 s of it decode): bf16 10 runs ~150 s;
#       # int4 / fp8 10 runs each ~120 s (fewer bytes per miss), a load with the GPU fit ~30 s and a kernel stage ~20 s
#       # each: ~490 s, less ~25 s of decode at --max-tokens 24: ~465 s, + synth ~20 s on a fresh machine (850 MB/s).
#       # Not measured yet: --budget-s 460 starts no row after 460 s, so the JSON is whole before the timeout
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
M=/dev/shm/olmoe
T=benchmarks/traces
STAGE=${1:-tests}
GPU_TESTS="tests/engine/test_static_gpu.py tests/engine/test_static_memory_gpu.py tests/test_engine_gpu.py tests/engine/test_gpu_paths.py"
mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
synth() {
  if [ ! -f $M/config.json ]; then
    rm -rf $M; timeout 200 python3 -m moeflow synth --like olmoe --out $M > "$OUT/synth.log" 2>&1; echo "synth rc $?" >> "$OUT/synth.log"
  fi
  mkdir -p $M/moeflow && cp models/demo/moeflow/eamc.npz models/demo/moeflow/predictor.pt $M/moeflow/
}
if [ "$STAGE" = tests ]; then
  timeout 540 python3 -m pytest -q -p no:cacheprovider -rf $GPU_TESTS 2>&1 | tee "$OUT/gpu-tests.log" | grep -v Warning | tail -30
elif [ "$STAGE" = buildtests ]; then
  taskset -c 12-15 timeout 540 python3 -m pytest -q -p no:cacheprovider -rf $GPU_TESTS > "$OUT/gpu-tests.log" 2>&1 &
  TESTS=$!
  PEERS_BUILD_ONLY=1 PEERS_LIMIT_S=${PEERS_LIMIT_S:-530} taskset -c 0-11 bash benchmarks/peers/run_h200.sh build 2>&1 | tail -15
  wait $TESTS; echo "gpu tests rc $?"; grep -v Warning "$OUT/gpu-tests.log" | tail -15
elif [ "$STAGE" = floor ]; then
  synth
  timeout 360 python3 benchmarks/decode_floor.py --model $M --trace $T/demo-eval.npz --out "$OUT/decode-floor-h200.json" \
    2>&1 | grep -v Warn | cut -c1-240 | tail -42
  timeout 140 python3 benchmarks/resident_step.py --model $M --trace $T/demo-eval.npz --modes compiled \
    --blocks "$OUT/decode-floor-h200.json" --out "$OUT/resident-step-h200.json" 2>&1 | grep -v Warn | cut -c1-300 | tail -8
elif [ "$STAGE" = quant ]; then
  synth
  timeout 540 python3 benchmarks/decode_floor.py --model $M --trace $T/demo-eval.npz --expert-dtypes bf16,int4,fp8 \
    --kernel-dtypes int4,fp8 --fractions 0.1,0.25 --policies lru,expertflow --max-tokens 24 --budget-s 460 \
    --out "$OUT/decode-floor-quant-h200.json" 2>&1 | grep -v Warn | cut -c1-240 | tail -60
elif [ "$STAGE" = mixtral ]; then
  X=/dev/shm/mixtral8
  timeout 200 python3 -m moeflow synth --like mixtral --layers 8 --out $X > "$OUT/synth-mixtral.log" 2>&1; tail -1 "$OUT/synth-mixtral.log"
  timeout 330 python3 benchmarks/decode_floor.py --model $X --trace .data/traces/mixtral.npz --geometry mixtral-8-layers \
    --batches 1 --requests 2 --max-tokens 48 --max-prompt 1 --no-kernel-stage --out "$OUT/decode-floor-mixtral-h200.json" \
    2>&1 | grep -v Warn | cut -c1-240 | tail -20
fi
