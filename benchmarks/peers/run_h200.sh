#!/usr/bin/env bash
# The peers benchmark on one H200, in two device calls of at most 10 minutes each, back to back:
#   MOEFLOW_COMMIT=<sha> bash benchmarks/peers/run_h200.sh build   # <= 9.3 min: llama.cpp CUDA build (timed, 5-8 min
#                          # expected) while the OLMoE synth checkpoint and its GGUF are made on the side; then
#                          # llama.cpp's runs if at least 150 s are left
#   MOEFLOW_COMMIT=<sha> bash benchmarks/peers/run_h200.sh run     # <= 9.3 min: the build's rest (<= 150 s) and
#                          # llama.cpp's runs if the build phase left them, moeflow (each policy, replayed routing),
#                          # transformers on the GPU, transformers + accelerate, moeflow on its own routing, as time allows
#   MOEFLOW_COMMIT=<sha> bash benchmarks/peers/run_h200.sh moeflow # <= 7 min (PEERS_LIMIT_S 420): moeflow alone,
#                          # into a fresh $OUT/peers-moeflow-h200.json: the checkpoint if /dev/shm lacks it (~45 s),
#                          # replayed routing (4 policies x 0.25, 0.125 x batch 1, 8: ~3-3.5 min, one engine load),
#                          # own routing (lru x 1.0, 0.25, 0.125 x batch 1, 8: ~1.5-2 min, a second load); estimate
#                          # 5.5-6.5 min in all. The replayed block starts nothing new 150 s before the deadline, so
#                          # the own-routing block keeps at least that; rows cut by a deadline are recorded as skipped.
#                          # Put the rows into the committed file with record.py replace (README.md).
# Everything lands in $OUT/peers-h200.json (+ logs). The build (.work/peers, gitignored), the checkpoint and the GGUF
# (/dev/shm) persist only while the machine stays warm between the calls; a cold second call redoes the synth and
# the conversion and, without a build, records llama.cpp as skipped. Merge two returned JSONs with
#   python3 benchmarks/peers/record.py merge A.json B.json --out benchmarks/results/peers-h200.json
# Every step runs under `timeout`, and none starts after the phase deadline (PEERS_LIMIT_S, default 560 s).
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
PHASE=${1:-run}
START=$(date +%s)
LIMIT=560; [ "$PHASE" = moeflow ] && LIMIT=420
DEADLINE=$((START + ${PEERS_LIMIT_S:-$LIMIT}))
W=$PWD/.work/peers
SRC=$W/llama.cpp
BUILD=${PEERS_BUILD:-$W/llama-cuda}
M=${PEERS_MODEL:-/dev/shm/olmoe}       # overrides for a rehearsal on a CPU machine
G=${PEERS_GGUF:-}
NAME=peers-h200.json; [ "$PHASE" = moeflow ] && NAME=peers-moeflow-h200.json  # the moeflow phase: its own file
J=${PEERS_JSON:-/dev/shm/$NAME}
LOG=$OUT/peers.log
NCMOE=${PEERS_NCMOE:-0,12,14}   # OLMoE: 16 layers; 12 -> 4/16 = 25% of the experts on the GPU, 14 -> 12.5%
FRACTIONS=0.25,0.125            # the same expert fractions for moeflow and accelerate
XARGS=${PEERS_MOEFLOW_ARGS:-}   # appended to the moeflow phase's runs (a CPU rehearsal: --device cpu --decode eager ...)
mkdir -p "$OUT" "$W"
if [ -z "$G" ]; then  # /dev/shm when it has room for the GGUF (and the checkpoint, if not made yet), else the disk
  G=/dev/shm/olmoe.gguf; NEED=$((15 << 20)); [ -f $M/config.json ] || NEED=$((30 << 20))
  [ -f $G ] || [ "$(df -k --output=avail /dev/shm | tail -1)" -ge $NEED ] || G=$W/olmoe.gguf
fi
left() { echo $((DEADLINE - $(date +%s))); }
upto() { local t=$(($(left) - $1)); echo $((t > 5 ? t : 5)); }  # seconds left before the last $1 of the phase
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo $((l > 5 ? l : 5)); }  # min(cap, time left)
say() { echo "[$(date +%T) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
save() {
  cp -f "$J" "$OUT/$NAME" 2>/dev/null
  [ -f "$(dirname "$J")/llama-runs.log" ] && cp -f "$(dirname "$J")/llama-runs.log" "$OUT/"
  [ -f "$W/build.log" ] && tail -150 "$W/build.log" > "$OUT/build.log"
}
trap save EXIT
record() { python3 -c "import sys; from benchmarks.peers.record import set_version as s; from pathlib import Path; s(Path('$J'), sys.argv[1], sys.argv[2])" "$1" "$2"; }
# a repeated `run` (machine still warm) skips the systems the result file already holds
done_sys() { python3 -c "import json,sys; d=json.load(open('$J')); sys.exit(0 if any(r['system'] == '$1' and r.get('routing', 'replay') == '${2:-replay}' for r in d['runs']) else 1)" 2>/dev/null; }
skip() { python3 -c "import sys; from benchmarks.peers.record import add_skip; from pathlib import Path; add_skip(Path('$J'), sys.argv[1], sys.argv[2])" "$1" "$2"; }

synth() {  # the OLMoE-geometry random checkpoint (~45 s) and, when asked, its bf16 GGUF (~1-2 min)
  if [ ! -f $M/config.json ]; then
    rm -rf $M
    timeout "$(cap 200)" python3 -m moeflow synth --like olmoe --out $M >> "$W/synth.log" 2>&1
    echo "synth rc $?" >> "$W/synth.log"
  fi
  if [ "${1:-}" = gguf ] && [ ! -f $G ] && [ -f $M/config.json ]; then
    timeout "$(cap 300)" python3 benchmarks/peers/to_gguf.py --llama-cpp "$SRC" --model $M --out $G.part \
      >> "$W/convert.log" 2>&1 && mv $G.part $G
    echo "convert rc $? $(ls -la $G 2>&1)" >> "$W/convert.log"
  fi
}

llama() {  # llama.cpp's runs, if built and converted
  local lib
  lib=$(bash benchmarks/peers/cuda_cmake_args.sh | sed -n 2p)  # cuBLAS from site-packages, when the toolkit lacks it
  [ -n "$lib" ] && export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if [ ! -x "$BUILD/bin/llama-batched-bench" ]; then skip llama.cpp "no CUDA build on this machine (run the build phase first, back to back)"; return; fi
  [ -f $G ] || synth gguf
  if [ ! -f $G ]; then skip llama.cpp "GGUF conversion failed: $(tail -c 300 "$W/convert.log")"; return; fi
  say "llama.cpp runs: -ngl 99, --n-cpu-moe $NCMOE, batch 1 and 8, 512 prompt + 128 generated (expect ~2 min)"
  timeout "$(cap 300)" python3 benchmarks/peers/llama_runs.py --bin "$BUILD/bin" --source "$SRC" --gguf $G --model $M \
    --out $J --n-cpu-moe "$NCMOE" --batches 1,8 --prompt 512 --gen 128 --timeout 100 --deadline "$DEADLINE" 2>&1 | tee -a "$LOG"
  save
}

[ "$PHASE" = build ] && rm -f "$J" "$(dirname "$J")/llama-runs.log"
[ "$PHASE" = moeflow ] && rm -f "$J"
python3 -c "from pathlib import Path; from benchmarks.peers.record import load, save; p=Path('$J'); r=load(p); r.setdefault('command', 'bash benchmarks/peers/run_h200.sh $PHASE'); save(p, r)"
record "gpu" "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
record "nvcc" "$(nvcc --version 2>&1 | tail -2 | tr '\n' ' ')"

if [ "$PHASE" = build ]; then
  say "phase build: expect llama.cpp CUDA build ~5-8 min (16 cores, sm_90 only; ninja, killed with its compilers at the deadline), synth ~45 s + GGUF ~1-2 min alongside,"
  say "then llama.cpp runs ~2 min if at least 150 s are left; deadline in $(left) s"
  [ -f "$SRC/CMakeLists.txt" ] || tar -xJf benchmarks/peers/llama.cpp.tar.xz -C "$W"
  record "llama.cpp" "$(tr '\n' ' ' < "$SRC/MOEFLOW_SOURCE")"
  (synth gguf) &
  SYNTH=$!
  T0=$(date +%s)
  if [ ! -x "$BUILD/bin/llama-batched-bench" ]; then
    CUDA_ARGS=$(bash benchmarks/peers/cuda_cmake_args.sh | head -1)
    say "cmake CUDA arguments found: $CUDA_ARGS"
    # shellcheck disable=SC2086
    { timeout 150 cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        $CUDA_ARGS -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF > "$W/build.log" 2>&1 &&
      timeout "$(cap $(($(left) - 20)))" ninja -C "$BUILD" -j "$(nproc)" llama-batched-bench llama-bench llama-completion \
        >> "$W/build.log" 2>&1; } ; RC=$?
    say "llama.cpp build rc $RC in $(($(date +%s) - T0)) s"
    record "llama_cpp_build" "rc $RC, $(($(date +%s) - T0)) s wall, -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90, $(nproc) jobs"
  fi
  wait $SYNTH
  say "synth + GGUF: $(tail -1 "$W/synth.log" 2>/dev/null); $(tail -1 "$W/convert.log" 2>/dev/null)"
  # PEERS_BUILD_ONLY=1: something else uses the GPU meanwhile (gpu_decode_h200.sh buildtests), so time nothing here
  if [ "${PEERS_BUILD_ONLY:-0}" = 0 ] && [ "$(left)" -ge 150 ]; then llama; else say "llama.cpp runs left to the run phase ($(left) s left)"; fi
  say "phase build done; now call the run phase at once (the machine stays warm ~30 s)"
  exit 0
fi

if [ "$PHASE" = moeflow ]; then  # moeflow alone, under the peers' budgets (moeflow_runs.py), into a fresh file
  say "phase moeflow: expect synth ~45 s if the checkpoint is not in /dev/shm, replayed routing ~3-3.5 min, own routing ~1.5-2 min; deadline in $(left) s"
  synth
  if [ ! -f $M/config.json ]; then skip moeflow "no checkpoint: $(tail -c 300 "$W/synth.log")"; exit 0; fi
  say "moeflow, replayed routing: lru, lfu, expertflow, moe-infinity at $FRACTIONS, batch 1 and 8 (nothing new after $(upto 150) s)"
  timeout -k 5 "$(upto 150)" python3 benchmarks/peers/moeflow_runs.py --model $M --trace benchmarks/traces/demo-eval.npz \
    --out $J --fractions $FRACTIONS --batches 1,8 --requests 8 --gen 24 --deadline $((DEADLINE - 150)) $XARGS 2>&1 | grep -v Warn | tee -a "$LOG"
  save
  say "moeflow, the checkpoint's own routing: lru at 1.0 (every expert resident, no budget), $FRACTIONS, batch 1 and 8"
  timeout -k 5 "$(upto 3)" python3 benchmarks/peers/moeflow_runs.py --model $M --routing own --out $J --policies lru \
    --fractions 1.0,$FRACTIONS --batches 1,8 --requests 8 --prompt 512 --gen 64 --deadline "$DEADLINE" $XARGS 2>&1 | grep -v Warn | tee -a "$LOG"
  say "phase moeflow done"
  exit 0
fi

say "phase run: expect llama.cpp's runs the build phase left (~2 min), moeflow ~3 min, hf-gpu ~1 min, hf-accelerate ~2 min; deadline in $(left) s"
synth
if [ -d "$BUILD" ] && [ ! -x "$BUILD/bin/llama-batched-bench" ]; then
  say "resuming the llama.cpp build the build phase left unfinished (at most 150 s)"
  timeout 150 ninja -C "$BUILD" -j "$(nproc)" llama-batched-bench llama-bench >> "$W/build.log" 2>&1
  say "llama.cpp build resumed: rc $?"
fi
llama  # whatever of llama.cpp's runs the build phase left undone (nothing if it did them all)
if ! done_sys moeflow-lru; then
  say "moeflow, replayed routing: lru, lfu, expertflow, moe-infinity at $FRACTIONS, batch 1 and 8 (expect ~3 min)"
  timeout "$(cap 240)" python3 benchmarks/peers/moeflow_runs.py --model $M --trace benchmarks/traces/demo-eval.npz --out $J \
    --fractions $FRACTIONS --batches 1,8 --requests 8 --gen 24 --deadline $((DEADLINE - 200)) 2>&1 | grep -v Warn | tee -a "$LOG"
  save
fi
if ! done_sys hf-gpu; then
  say "hf-gpu: transformers, every weight on the GPU (expect ~1 min)"
  timeout "$(cap 100)" python3 benchmarks/peers/hf_runs.py --model $M --out $J --system hf-gpu --batches 1,8 --prompt 512 \
    --gen 128 --deadline "$DEADLINE" 2>&1 | grep -v Warn | tail -20 | tee -a "$LOG"
  save
fi
if ! done_sys hf-accelerate; then
  say "hf-accelerate: device_map=auto, max_memory = dense + $FRACTIONS of the experts, 16 generated tokens (expect ~2 min)"
  timeout "$(cap 200)" python3 benchmarks/peers/hf_runs.py --model $M --out $J --system hf-accelerate --fractions $FRACTIONS \
    --batches 1,8 --prompt 512 --gen 16 --deadline "$DEADLINE" 2>&1 | grep -v Warn | tail -20 | tee -a "$LOG"
  save
fi
if done_sys moeflow-lru own; then
  :
elif [ "$(left)" -ge 90 ]; then
  say "moeflow, the checkpoint's own routing: lru at $FRACTIONS and 1.0 (every expert resident), 512 prompt, 64 generated"
  timeout "$(cap 200)" python3 benchmarks/peers/moeflow_runs.py --model $M --routing own --out $J --policies lru \
    --fractions $FRACTIONS,1.0 --batches 1,8 --requests 8 --prompt 512 --gen 64 --deadline "$DEADLINE" 2>&1 | grep -v Warn | tee -a "$LOG"
else
  skip moeflow-own-routing "not run: $(left) s left"
fi
skip moe-infinity "not run: see benchmarks/peers/README.md (needs transformers 4.x; no OLMoE support upstream)"
say "phase run done"
