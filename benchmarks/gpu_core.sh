#!/usr/bin/env bash
# One device call: versions, GPU correctness tests, then the OLMoE-geometry decode benchmark.
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -x tests/test_engine_gpu.py tests/test_engine.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
python3 benchmarks/olmoe_decode.py --model /tmp/olmoe-synth --tokens 48 --e2e-backends triton,batched \
  --out "$OUT/olmoe-decode-h100.json" 2>&1 | tail -40
