#!/usr/bin/env bash
# The GPU check, one command, under 8 minutes by construction on one H200 benchmark host:
#
#     bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: bench/results
#
# That host runs a fixed image (its own python3 with torch 2.11 and Triton 3.6, no DALI, no
# package index), so nothing is installed or built: the CUDA path of directclr needs no native
# extension. Every step runs under a time budget (seconds below, 455 in all, each cut to what is
# left of DEADLINE_S) and writes its rows as each case ends, so a timeout loses one case, not the
# step. The loss cases are the static report's estimates (python -m directclr.gpu_report,
# docs/kernels.md: H200 bands at N = 4,096, 16,384, 65,536 for cross and ntxent at dim 128, 360
# and 2048, fused / eager / torch.compile), so the first GPU run gives the measured column beside
# each band; every case is a fresh process of a few seconds beyond Triton's first compile (~10 s,
# cached on disk after) and torch.compile's (tens of seconds: so at the smaller N only).
#   0. which modules import here (torch, triton, pytest, numpy, torchvision, PIL, nvidia.dali):
#      a step that needs a missing one is skipped with one line saying so
#   1. environment facts                                   -> OUT_DIR/gpu_env.json
#   2. the GPU tests (CUDA cases of the loss and spectrum tests)  -> OUT_DIR/gpu_tests.xml
#   3. the loss benchmark, bf16, N = 4096, 16384, 65536, cross and ntxent: dim 360 first (fused /
#      eager / torch.compile up to N = 16384, this GPU's bf16 matmul peak measured in the same
#      run), then dims 128 and 2048 (fused / eager; torch.compile at N = 4096)
#                                                          -> OUT_DIR/bench_loss.jsonl
#   4. the spectrum benchmark, bf16, 65,536 x 2048, vs torch.cov -> OUT_DIR/bench_spectrum.jsonl
#   5. the training benchmark, resnet50, 224 px, batch 256, bf16, the model alone on batches in
#      memory (the whole loop too where DALI imports)      -> OUT_DIR/bench_train.jsonl
#   6. the data benchmark (DALI GPU vs torchvision) where DALI imports
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0
DEADLINE_S=${DEADLINE_S:-470}
start=$(date +%s)

# left BUDGET: the seconds a step may take, its budget cut to what is left before the deadline.
left() {
  local rest=$(( DEADLINE_S - ($(date +%s) - start) ))
  (( rest < $1 )) && echo $(( rest > 1 ? rest : 1 )) || echo "$1"
}

# Step 0: one line per module, then a helper that skips a step with one clear line.
"$PY" - <<'PYEOF' | tee "$OUT/gpu_modules.txt"
import importlib
for name in ("torch", "triton", "pytest", "numpy", "torchvision", "PIL", "nvidia.dali"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'ok')}")
    except Exception as error:  # noqa: BLE001 -- any failure to import means "absent" here
        print(f"{name}: MISSING ({type(error).__name__})")
PYEOF
"$PY" -m directclr info > "$OUT/gpu_info.txt" 2>&1 || true  # backends as directclr sees them
has() { ! grep -q "^$1: MISSING" "$OUT/gpu_modules.txt"; }
needs() {  # needs STEP MODULE...: true, or prints why STEP is skipped
  local step=$1 missing=(); shift
  for module in "$@"; do has "$module" || missing+=("$module"); done
  (( ${#missing[@]} == 0 )) && return 0
  echo "$step: skipped (${missing[*]} missing on this host)"; return 1
}

needs "environment" torch triton && "$PY" - <<'PYEOF' | tee "$OUT/gpu_env.json"
import json, platform, torch, triton
print(json.dumps({"torch": torch.__version__, "triton": triton.__version__,
                  "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
                  "capability": torch.cuda.get_device_capability(),
                  "python": platform.python_version()}))
PYEOF

tests_rc=0
if needs "GPU tests" torch triton pytest numpy; then
  timeout "$(left 70)" "$PY" -m pytest -q -p no:cacheprovider tests/op/test_infonce_triton.py \
    tests/spectrum/test_spectrum.py -k "cuda or gpu" --junitxml "$OUT/gpu_tests.xml" 2>&1 | tail -25
  tests_rc=${PIPESTATUS[0]}
fi

# loss_bench BUDGET DIM COMPILED_MAX_N [EXTRA...]: the static report's cases at one dim.
loss_bench() {
  local budget; budget=$(left "$1")
  timeout "$budget" "$PY" bench/bench_loss.py --device cuda --dtype bfloat16 --dim "$2" \
    --n 4096 16384 65536 --ntxent-max-n 65536 --compiled-max-n "$3" "${@:4}" \
    --repeats 3 --budget "$(( budget - 10 ))" --min-case-s 15 --timeout 60 --results-dir "$OUT"
}
bench_rc=0
if needs "loss bench" torch triton; then
  loss_bench 140 360 16384 --matmul-peak || bench_rc=$?
  loss_bench 60 128 4096 || bench_rc=$?
  loss_bench 60 2048 4096 || bench_rc=$?
fi

spectrum_rc=0
if needs "spectrum bench" torch triton; then
  timeout "$(left 35)" "$PY" bench/bench_spectrum.py --device cuda --dtype bfloat16 --n 65536 \
    --repeats 5 --results-dir "$OUT"
  spectrum_rc=$?
fi

if needs "train bench" torch torchvision PIL numpy; then
  budget=$(left 75)
  if has nvidia.dali; then train_what="model loop"; case_s=$(( budget / 2 - 3 )); else
    train_what="model"; case_s=$(( budget - 5 ))
    echo "train bench: whole loop skipped (nvidia.dali missing: CPU decoding would be timed)"; fi
  timeout "$budget" "$PY" bench/bench_train.py --device cuda --arch resnet50 --dim 360 \
    --image-size 224 --batch-size 256 --data synthetic --loader auto --threads "$(nproc)" \
    --warmup 3 --steps 10 --what $train_what --timeout "$case_s" --results-dir "$OUT" \
    || echo "train bench failed"
fi

if needs "data bench" torch torchvision PIL numpy nvidia.dali; then
  timeout "$(left 15)" "$PY" bench/bench_data.py --device cuda --threads "$(nproc)" \
    --batch-size 128 --batches 20 --images 2000 --results-dir "$OUT" || echo "data bench failed"
fi

echo "gpu_check: tests rc=$tests_rc, loss bench rc=$bench_rc, spectrum bench rc=$spectrum_rc," \
  "$(( $(date +%s) - start )) s in all"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$spectrum_rc" -eq 0 ]
