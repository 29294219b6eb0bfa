#!/usr/bin/env bash
# Device calls for the static / CUDA-graph decode. Stages run in the order given, in one call, each under `timeout`
# and none past the call's deadline (GPU_LIMIT_S, default 570 s after the start); pass MOEFLOW_COMMIT=<sha>:
#   MOEFLOW_COMMIT=<sha> bash benchmarks/gpu_decode_h200.sh tests ttft serve mixtral
# Stages:
#   floor      benchmarks/decode_floor.py (kernel stage: tile options over every layer, then each batch size runs its
#              fastest; LRU / ExpertFlow / MoE-Infinity at 10/25/50%, batch 1 and 8, demo routing replayed), then
#              benchmarks/resident_step.py with the chosen tiles (compiled step, replay vs host time, kernels per
#              replay; TTFT against transformers)                                                  (~500 s)
#   buildtests the peers' build phase (benchmarks/peers/run_h200.sh build) on cores 0-11 while the GPU tests run on
#              cores 12-15 (correctness and peak memory only: nothing timed there)                 (~540 s)
#   tests      the GPU tests ($GPU_TESTS to choose; default: all the GPU test files)
#   ttft       resident_step.py --ttft-only: time to first token, prefill through the slot table (each tile option)
#              and eager, 128/512/2048 tokens, against transformers                                 (~90 s)
#   serve      benchmarks/serve_throughput.py: 32 streams against LLM.generate at batch 32 and against batch-1 serving
#              (issue 13; SERVE_MODES, default offline,offline-serial,serve,serve-1); warm-ups compile the step
#              for each batch shape (~60-90 s each)                                                  (~420 s)
#   serveload  benchmarks/serve_load.py on the GPU: `moeflow serve` over HTTP at OLMoE geometry (its own routing),
#              64 streaming clients for SERVELOAD_S (120) s, 32 rows, through a stand-in tokenizer (one word per
#              token id, so that text streams and TTFT can be timed); carry .data/wheels (only the cp312 pydantic-core:
#              the tree and the carry together must stay under 64 MiB): the serve extra's wheels,
#              which the GPU image lacks (pure Python but pydantic-core; fetched on the CPU machine with
#              `pip download --no-deps -d .data/wheels fastapi starlette uvicorn h11 click prometheus-client httpx
#              httpcore anyio sniffio idna certifi typing-extensions annotated-types typing-inspection pydantic annotated-doc
#              opentelemetry-api` (fastapi 0.165 needs the last two)
#              and `pip download --no-deps --only-binary=:all: --python-version 312 --platform manylinux2014_x86_64
#              -d .data/wheels pydantic-core==<pydantic's pin>`)                                     (~250 s)
#   overlap    resident_step.py, compiled graph decode without and with EngineConfig.overlap (engine/overlap.py:
#              step N+1 launched before step N is settled), batch 1 and 8, no TTFT; then its GPU tests   (~250 s)
#   lag        the offloaded overlap (EngineConfig.overlap_offloaded: the next step launched before the last is
#              settled, on a cache plan one step behind): decode_floor.py rows without and with it, bf16 and int4,
#              25% cached, batch 1 and 8, LRU and ExpertFlow (LAG_DTYPES, LAG_FRACTIONS, LAG_POLICIES); then its GPU
#              tests (tests/engine/test_overlap_offloaded_gpu.py)                                   (~450 s)
#   mixtral    Mixtral geometry (first 8 layers), the real Mixtral trace, batch 1 (carry .data/traces after
#              `moeflow trace-import`; its synth starts in the background at the call's start); MIXTRAL_DTYPES
#              (default bf16), MIXTRAL_FRACTIONS (0.25,0.5), MIXTRAL_POLICIES (decode_floor's default)  (~350 s)
#              MIXTRAL_PRECOPY (auto: the engine default, 0, 1 or 0,1), MIXTRAL_KERNEL_STAGE="--kernel-dtypes int4"
#              runs the tile stage
#   quant      quantised experts (issue 14): bf16 / int4 / fp8 rows at 10% and 25%, batch 1 and 8, LRU and
#              ExpertFlow, in decode-floor-quant-h200.json (rows carry expert_dtype); int4 and fp8 first get a
#              kernel stage of the quantised kernel (benchmarks/kernel_tiles.py QUANT_VARIANTS, 5 tile options; bf16
#              keeps slot_kernel.BLOCKS); load_s_by_dtype: engine build, the GPU quantisation fit included.
#              Estimate from the floor stage (~15 s a run with its warm-up and captures): ~465 s, not measured
#              yet; --budget-s 460 starts no row after 460 s, so the JSON is whole before the timeout  (~465 s)
#              PRECOPY (default auto: the engine's default; 0,1: each offloaded row without and with experts/precopy.py's
#              copy of the claimed misses before the projections); QUANT_DTYPES (default int4,bf16,fp8) in that order; QUANT_FRACTIONS,
#              QUANT_POLICIES; PROFILE_ROWS=1: each row also gets a torch-profiler run (device time per kernel)
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
M=/dev/shm/olmoe
T=benchmarks/traces
START=$(date +%s)
DEADLINE=$((START + ${GPU_LIMIT_S:-570}))
GPU_TESTS=${GPU_TESTS:-"tests/engine/test_static_gpu.py tests/engine/test_static_memory_gpu.py tests/test_engine_gpu.py tests/engine/test_gpu_paths.py tests/engine/test_slot_prefill_gpu.py tests/engine/test_batch_gpu.py tests/engine/test_static_quant_gpu.py tests/quant/test_fit_gpu.py tests/engine/test_overlap_gpu.py tests/engine/test_overlap_offloaded_gpu.py"}
X=/dev/shm/mixtral8
cap() { local l=$((DEADLINE - $(date +%s))); [ "$1" -lt "$l" ] && echo "$1" || echo $((l > 5 ? l : 5)); }  # min(cap, time left)
say() { echo "[+$(($(date +%s) - START))s] $*" | tee -a "$OUT/stages.log"; }
mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
synth() {
  if [ ! -f $M/config.json ]; then
    rm -rf $M; timeout 200 python3 -m moeflow synth --like olmoe --out $M > "$OUT/synth.log" 2>&1; echo "synth rc $?" >> "$OUT/synth.log"
  fi
  mkdir -p $M/moeflow && cp models/demo/moeflow/eamc.npz models/demo/moeflow/predictor.pt $M/moeflow/
}
MIXTRAL_SYNTH=
case " $* " in *" mixtral "*)  # the 22 GB Mixtral checkpoint is written while the earlier stages run (4 cores, niced)
  if [ ! -f $X/config.json ]; then
    (rm -rf $X; timeout 300 nice -n 19 taskset -c 12-15 python3 -m moeflow synth --like mixtral --layers 8 --out $X > "$OUT/synth-mixtral.log" 2>&1;
     echo "synth rc $?" >> "$OUT/synth-mixtral.log") &
    MIXTRAL_SYNTH=$!
  fi;;
esac
run_stage() {
  local STAGE=$1
if [ "$STAGE" = tests ]; then
  # shellcheck disable=SC2086
  timeout "$(cap 540)" python3 -m pytest -q -p no:cacheprovider -rf $GPU_TESTS 2>&1 | tee "$OUT/gpu-tests.log" | grep -v Warning | tail -30
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
elif [ "$STAGE" = ttft ]; then
  synth
  timeout "$(cap 150)" python3 benchmarks/resident_step.py --model $M --trace $T/demo-eval.npz --ttft-only ${TTFT_ARGS:-} \
    --out "$OUT/ttft-h200.json" 2>&1 | grep -v Warn | cut -c1-300 | tail -24
elif [ "$STAGE" = serve ]; then
  synth
  timeout "$(cap 420)" python3 benchmarks/serve_throughput.py --model $M --trace $T/demo-eval.npz --profile --modes ${SERVE_MODES:-offline,offline-serial,serve,serve-1} \
    --out "$OUT/serve-throughput-h200.json" 2>&1 | grep -v Warn | cut -c1-300 | tail -16
elif [ "$STAGE" = quant ]; then
  synth
  timeout "$(cap 540)" python3 benchmarks/decode_floor.py --model $M --trace $T/demo-eval.npz --expert-dtypes ${QUANT_DTYPES:-int4,bf16,fp8} \
    --kernel-dtypes int4,fp8 --fractions ${QUANT_FRACTIONS:-0.25,0.1} --policies ${QUANT_POLICIES:-lru,expertflow} --max-tokens 24 --budget-s ${QUANT_BUDGET_S:-460} \
    --precopy ${PRECOPY:-auto} ${PROFILE_ROWS:+--profile-rows} \
    --out "$OUT/decode-floor-quant-h200.json" 2>&1 | grep -v Warn | cut -c1-240 | tail -60
elif [ "$STAGE" = serveload ]; then
  synth
  # the GPU image has no uvicorn: wheels carried in .data/wheels (see the stage list above)
  python3 -c "import uvicorn, fastapi, prometheus_client, httpx" 2>/dev/null || \
    python3 -m pip install -q --no-index --find-links .data/wheels fastapi uvicorn prometheus-client httpx 2>&1 | tail -2
  timeout "$(cap 300)" python3 benchmarks/serve_load.py --model $M --standin-tokenizer --device cuda --clients 64 --duration ${SERVELOAD_S:-120} --max-batch 32 \
    --max-tokens 64 --out "$OUT/serve-load-h200.json" 2>&1 | grep -v Warn | cut -c1-300 | tail -8
elif [ "$STAGE" = overlap ]; then
  synth
  timeout "$(cap 240)" python3 benchmarks/resident_step.py --model $M --trace $T/demo-eval.npz --modes compiled,compiled+overlap \
    --no-ttft --out "$OUT/resident-step-overlap-h200.json" 2>&1 | grep -v Warn | cut -c1-300 | tail -8
  timeout "$(cap 200)" python3 -m pytest -q -p no:cacheprovider -rf tests/engine/test_overlap_gpu.py 2>&1 \
    | tee "$OUT/gpu-tests-overlap.log" | grep -v Warning | tail -12
elif [ "$STAGE" = lag ]; then
  synth
  timeout "$(cap 420)" python3 benchmarks/decode_floor.py --model $M --trace $T/demo-eval.npz --expert-dtypes ${LAG_DTYPES:-bf16,int4} \
    --no-kernel-stage --fractions ${LAG_FRACTIONS:-0.25} --policies ${LAG_POLICIES:-lru,expertflow} --max-tokens 24 \
    --overlap-offloaded 0,1 --budget-s 380 --out "$OUT/decode-floor-lag-h200.json" 2>&1 | grep -v Warn | cut -c1-240 | tail -40
  timeout "$(cap 200)" python3 -m pytest -q -p no:cacheprovider -rf tests/engine/test_overlap_offloaded_gpu.py 2>&1 \
    | tee "$OUT/gpu-tests-lag.log" | grep -v Warning | tail -12
elif [ "$STAGE" = mixtral ]; then
  if [ -n "$MIXTRAL_SYNTH" ]; then wait $MIXTRAL_SYNTH; fi
  tail -1 "$OUT/synth-mixtral.log" 2>/dev/null
  timeout "$(cap 330)" python3 benchmarks/decode_floor.py --model $X --trace .data/traces/mixtral.npz --geometry mixtral-8-layers \
    --batches 1 --requests 2 --max-tokens 48 --max-prompt 1 ${MIXTRAL_KERNEL_STAGE:---no-kernel-stage} --precopy ${MIXTRAL_PRECOPY:-auto} --fractions ${MIXTRAL_FRACTIONS:-0.25,0.5} \
    --expert-dtypes ${MIXTRAL_DTYPES:-bf16} ${MIXTRAL_POLICIES:+--policies $MIXTRAL_POLICIES} --out "$OUT/decode-floor-mixtral-h200.json" \
    2>&1 | grep -v Warn | cut -c1-240 | tail -20
fi
}
for stage in "${@:-tests}"; do
  if [ $((DEADLINE - $(date +%s))) -lt 30 ]; then say "stage $stage skipped: past the deadline"; continue; fi
  say "stage $stage"
  run_stage "$stage"
  say "stage $stage done"
done
