#!/usr/bin/env bash
# The GPU check, one command, under 8 minutes on one H200 benchmark host:
#
#     bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: bench/results
#
# That host runs a fixed image (its own python3 with torch 2.11 and Triton 3.6, no DALI, no
# package index), so nothing is installed or built: the CUDA path of directclr needs no native
# extension. Steps:
#   1. environment facts              -> OUT_DIR/gpu_env.json
#   2. the GPU tests (CUDA cases of tests/test_infonce_triton.py) -> OUT_DIR/gpu_tests.xml
#   3. the loss benchmark, bf16, dim 360, N in {4096 ... 1048576}, fused / reference eager /
#      torch.compile(reference) where they fit, with this GPU's own bf16 matmul peak measured in
#      the same run -> rows appended to OUT_DIR/bench_loss.jsonl, table printed
#   4. the spectrum benchmark, bf16, 50,000 and 65,536 x 2048, vs torch.cov
#      -> OUT_DIR/bench_spectrum.jsonl
#   5. the training benchmark: resnet50, 224 px, batch 256, bf16 autocast, channels_last, the
#      model alone on batches in memory; the whole loop on synthetic JPEGs too where DALI imports
#      -> OUT_DIR/bench_train.jsonl
#   6. the data benchmark (DALI GPU vs torchvision, all cores) where DALI imports; the H200
#      host's image has none, so there it prints why it skipped
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0
start=$(date +%s)

"$PY" - <<'PYEOF' | tee "$OUT/gpu_env.json"
import json, platform, torch, triton
print(json.dumps({"torch": torch.__version__, "triton": triton.__version__,
                  "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
                  "capability": torch.cuda.get_device_capability(),
                  "python": platform.python_version()}))
PYEOF

timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_infonce_triton.py tests/test_spectrum.py -k "cuda or gpu" \
  --junitxml "$OUT/gpu_tests.xml" 2>&1 | tail -25
tests_rc=${PIPESTATUS[0]}

timeout 330 "$PY" bench/bench_loss.py --device cuda --dtype bfloat16 \
  --n 4096 16384 65536 262144 1048576 --ntxent-max-n 262144 --compiled-max-n 16384 \
  --repeats 3 --matmul-peak --timeout 120 --results-dir "$OUT"
bench_rc=$?

timeout 90 "$PY" bench/bench_spectrum.py --device cuda --dtype bfloat16 --n 50000 65536 \
  --repeats 5 --results-dir "$OUT"
spectrum_rc=$?

if "$PY" -c "import nvidia.dali" 2>/dev/null; then train_what="model loop"; else
  train_what="model"; echo "train bench: whole loop skipped (no DALI: CPU decoding would be timed)"; fi
timeout 230 "$PY" bench/bench_train.py --device cuda --arch resnet50 --dim 360 --image-size 224 \
  --batch-size 256 --data synthetic --loader auto --threads "$(nproc)" --warmup 3 --steps 10 \
  --what $train_what --timeout 100 --results-dir "$OUT" || echo "train bench failed"

if "$PY" -c "import nvidia.dali" 2>/dev/null; then
  timeout 120 "$PY" bench/bench_data.py --device cuda --threads "$(nproc)" --batch-size 128 \
    --batches 20 --images 2000 --results-dir "$OUT" || echo "data bench failed"
else
  echo "data bench: skipped (nvidia.dali does not import on this host)"
fi

echo "gpu_check: tests rc=$tests_rc, loss bench rc=$bench_rc, spectrum bench rc=$spectrum_rc," \
  "$(( $(date +%s) - start )) s in all"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$spectrum_rc" -eq 0 ]
