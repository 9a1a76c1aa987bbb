#!/usr/bin/env bash
# The GPU check: for a machine with an NVIDIA GPU (compute capability 8.0+), Python with PyTorch
# and transformers, but no Rust toolchain and no network. Build and strip the release binary
# beforehand and carry it along:
#
#   cargo build --release && mkdir -p gpu-carry && strip -o gpu-carry/kojo target/release/kojo
#   scripts/gpu-check.sh [KOJO_BINARY [OUT_DIR]]      (defaults: gpu-carry/kojo, $OUT or gpu-check-out)
#
# With the device tool: run `scripts/gpu-check.sh` with carry ["gpu-carry"] and timeout_s 600.
# Steps (each under its own time limit, 500 s at most in all):
#   1. kojo kernels check: every kernel compiles with NVRTC for sm_80 and sm_90, no spills
#   2. kojo gpu-check: every kernel against the CPU backend on the GPU, then a random model with
#      SmolLM2-135M's shapes on both backends (logits every step, 32 greedy tokens; decode steps
#      recorded and replayed as CUDA graphs); when it fails, again with KOJO_CUDA_GRAPHS=0
#   3. the same random model in Hugging Face transformers: logits against kojo's
#   4. the ceilings through PyTorch: device-to-device copy bandwidth, an 8192^3 bf16 GEMM
#   5. kojo bench on Llama-3-8B's shapes (bf16 random weights): prefill of 2,048 tokens, decode
#      at batch 1, 8 and 64 over 1,024 cached tokens; the same shapes in Q4_K_M's types at batch 1; and
#      SmolLM2-135M's shapes at batch 1
#   6. the kernel lab (kojo kernels bench): each op alone at Llama-3-8B's shapes, against the
#      copy bandwidth and the bf16 GEMM rate it measures itself
#   7. a Markdown table, printed last: each figure beside its floor, then the lab's table
# Everything is written to a scratch folder ($WORK, default a new one under /tmp); OUT_DIR gets two
# files: table.md and logs.tgz (every log and JSON, without the model and the kernel cache), as
# the device tool brings back only a few files. Exit status: non-zero when a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
KOJO=${1:-${KOJO:-gpu-carry/kojo}}
OUT=${2:-${OUT:-gpu-check-out}}
mkdir -p "$OUT"
OUT=$(readlink -f "$OUT")
KOJO=$(readlink -f "$KOJO")
W=${WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$W"
status=0
step() { echo "== $*" | tee -a "$W/steps.log"; }
# run NAME SECONDS CMD...: stdout to $W/NAME.out, stderr to $W/NAME.err
run() {
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$W/$name.out" 2>"$W/$name.err"
  local rc=$?
  echo "   $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$W/steps.log"
  [ $rc -eq 0 ] || { status=1; tail -n 5 "$W/$name.err"; }
  return $rc
}

# NVRTC and the CUDA headers: from the toolkit nvcc belongs to, /usr/local/cuda, or PyTorch's
# nvidia wheels, unless CUDA_HOME says otherwise
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  elif [ -f /usr/local/cuda/include/cuda_fp16.h ]; then
    CUDA_HOME=/usr/local/cuda
  else
    CUDA_HOME=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || echo /usr/local/cuda)
  fi
fi
export CUDA_HOME
echo "CUDA_HOME=$CUDA_HOME"
export KOJO_CACHE_DIR="$W/kernel-cache"
export RUST_LOG=${RUST_LOG:-info}

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee "$W/gpu.txt"
git rev-parse --short HEAD 2>/dev/null > "$W/commit.txt" || echo unknown > "$W/commit.txt"
date -u +%Y-%m-%dT%H:%MZ > "$W/date.txt"
"$KOJO" --version | tee "$W/version.txt"

step "1. kernels compile for sm_80 and sm_90 without spills"
run kernels-check 30 "$KOJO" kernels check --arch sm_80,sm_90

step "2. kernels and a SmolLM2-shaped random model, GPU against CPU"
if ! run gpu-check 100 "$KOJO" gpu-check --out "$W" --tokens 32; then
  # recorded decode steps (CUDA graphs) are the newest and least tested part: say whether the
  # check passes without them
  step "2b. the same with decode steps not recorded (KOJO_CUDA_GRAPHS=0)"
  mkdir -p "$W/no-graphs"
  (export KOJO_CUDA_GRAPHS=0; run gpu-check-no-graphs 60 "$KOJO" gpu-check --out "$W/no-graphs" --tokens 32)
fi
tail -n 3 "$W/gpu-check.out"

step "3. the same model in transformers"
run hf 60 python3 scripts/gpu_check.py hf "$W"

step "4. ceilings through PyTorch"
run ceilings 30 python3 scripts/gpu_check.py ceilings "$W"

step "5. benchmarks"
run bench-8b 130 "$KOJO" bench -m random:llama3-8b:bf16 --device cuda -p 2048 -n 16 --parallel 1,8,64 -d 1024 -r 1 --json
run bench-8b-q4k 60 "$KOJO" bench -m random:llama3-8b:q4_k_m --device cuda -p 0 -n 32 -r 1 --json
run bench-small 30 "$KOJO" bench -m random:smollm2-135m:bf16 --device cuda -p 512 -n 128 -r 2 --json

step "6. kernel lab"
run lab 60 "$KOJO" kernels bench --device cuda --json "$W/lab.json"

step "7. table"
python3 scripts/gpu_check.py table "$W" > "$W/table.md" || status=1
echo "check status: $status" >> "$W/table.md"
cp "$W/table.md" "$OUT/table.md"
tar czf "$OUT/logs.tgz" -C "$W" --exclude small-model --exclude kernel-cache .
cat "$OUT/table.md"
exit $status
