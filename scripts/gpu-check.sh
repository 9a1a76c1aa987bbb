#!/usr/bin/env bash
# The GPU check: for a machine with an NVIDIA GPU (compute capability 8.0+), Python with PyTorch
# and transformers, but no Rust toolchain and no network. Build and strip the release binary
# beforehand and carry it along:
#
#   cargo build --release && mkdir -p gpu-carry && strip -o gpu-carry/kojo target/release/kojo
#   scripts/gpu-check.sh [KOJO_BINARY [OUT_DIR]]      (defaults: gpu-carry/kojo, $OUT or gpu-check-out)
#
# Steps (each under its own time limit; the whole run stays under 8 minutes):
#   1. kojo kernels check: every kernel compiles with NVRTC for sm_80 and sm_90, no spills
#   2. kojo gpu-check: every kernel against the CPU backend on the GPU, then a random model with
#      SmolLM2-135M's shapes on both backends (logits every step, 32 greedy tokens)
#   3. the same random model in Hugging Face transformers: logits against kojo's
#   4. the ceilings through PyTorch: device-to-device copy bandwidth, an 8192^3 bf16 GEMM
#   5. kojo bench on Llama-3-8B's shapes (bf16 random weights): prefill of 2,048 tokens, decode
#      at batch 1, 8 and 64; and SmolLM2-135M's shapes at batch 1
#   6. a Markdown table, printed last: each figure beside its floor
# Logs and JSON go to OUT_DIR. Exit status: non-zero when a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
KOJO=${1:-${KOJO:-gpu-carry/kojo}}
OUT=${2:-${OUT:-gpu-check-out}}
mkdir -p "$OUT"
KOJO=$(readlink -f "$KOJO")
status=0
step() { echo "== $*" | tee -a "$OUT/steps.log"; }
# run NAME SECONDS CMD...: output to $OUT/NAME.log (JSON output to $OUT/NAME.json when asked)
run() {
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  local rc=$?
  echo "   $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
  [ $rc -eq 0 ] || { status=1; tail -n 5 "$OUT/$name.err"; }
  return $rc
}

# NVRTC and the CUDA headers: from the toolkit nvcc belongs to, unless CUDA_HOME says otherwise
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME
export KOJO_CACHE_DIR="$OUT/kernel-cache"
export RUST_LOG=${RUST_LOG:-info}

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null > "$OUT/commit.txt" || echo unknown > "$OUT/commit.txt"
date -u +%Y-%m-%dT%H:%MZ > "$OUT/date.txt"
"$KOJO" --version | tee "$OUT/version.txt"

step "1. kernels compile for sm_80 and sm_90 without spills"
run kernels-check 120 "$KOJO" kernels check --arch sm_80,sm_90

step "2. kernels and a SmolLM2-shaped random model, GPU against CPU"
run gpu-check 240 "$KOJO" gpu-check --out "$OUT" --tokens 32
tail -n 3 "$OUT/gpu-check.out"

step "3. the same model in transformers"
run hf 120 python3 scripts/gpu_check.py hf "$OUT"

step "4. ceilings through PyTorch"
run ceilings 60 python3 scripts/gpu_check.py ceilings "$OUT"

step "5. benchmarks"
run bench-8b 240 "$KOJO" bench -m random:llama3-8b:bf16 --device cuda -p 2048 -n 16 --parallel 1,8,64 -r 1 --json
run bench-small 60 "$KOJO" bench -m random:smollm2-135m:bf16 --device cuda -p 512 -n 128 -r 2 --json

step "6. table"
python3 scripts/gpu_check.py table "$OUT" > "$OUT/table.md"
echo "check status: $status" >> "$OUT/table.md"
cat "$OUT/table.md"
exit $status
