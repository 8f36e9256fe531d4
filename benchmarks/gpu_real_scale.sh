#!/usr/bin/env bash
# Real-scale figures on a lent CUDA machine, in one call of at most ~9.5 minutes (BUDGET_S, default 540 s):
# full-size SD1.5 at 512 px fp16 and SDXL at 1024 px bf16, random weights (configs/architectures), via
# `difffeat bench SUITE --arch ARCH --device cuda`, most important first:
#   1. goca (SD1.5 512 fp16, SDXL 1024 bf16): segment time split vs the bare forward, kept maps, CUDA
#      allocator peak of a segmentation over a bare forward (fresh subprocess);
#   2. throughput (the same two): images/s of batched segmentation at batch 1, 4, 8 (target: batch 8 >= 3x
#      batch 1), ratios measured in the same run;
#   3. SDXL goca at 1536 and 2048 px: CUDA peak memory at high resolution.
# Each step is bounded by a timeout (capped by what is left of BUDGET_S), so an out-of-memory or slow step
# leaves the others' JSON. Writes OUT_DIR/bench_*.json (copy them to benchmarks/results/, then run
# `python benchmarks/real_scale_readme.py`) and OUT_DIR/logs.tgz (env.txt + every step's log): 7 files, within
# the device tool's 8-file limit.
#
# The device image lacks diffusers (and importlib_metadata, pycocotools); bring them as wheels. Once, here,
# in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata pycocotools
# then run (device tool): command `bash benchmarks/gpu_real_scale.sh "$OUT"`, carry [".whl"], timeout_s 600.
# The script installs .whl/*.whl into /tmp/site when `import diffusers` fails.
#
# DRY_RUN=1 bash benchmarks/gpu_real_scale.sh OUT_DIR: the same steps on the CPU with SD1.5 at 64 px, fp32,
# one repeat, a one-layer text encoder (SDXL steps use SD1.5 too: SDXL does not fit a small CPU machine), to
# check the script's plumbing without a GPU (5-15 minutes on 2 cores, ~5 GB of memory; budget 3600 s).
# Usage: [DRY_RUN=1] [BUDGET_S=540] [PYTHON=python3] bash benchmarks/gpu_real_scale.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: gpu_real_scale.sh OUT_DIR}
DRY_RUN=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-$([ "$DRY_RUN" = 1 ] && echo 3600 || echo 540)}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD:${PYTHONPATH:-}"
py=${PYTHON:-python3}
if ! $py -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; uptime
  $py -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  echo "DRY_RUN=$DRY_RUN BUDGET_S=$BUDGET_S"; } > "$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"

bench() {  # NAME TIMEOUT_S SUITE ARCH RESOLUTION DTYPE [ARGS...]
  local name=$1 limit=$2 suite=$3 arch=$4 res=$5 dtype=$6; shift 6
  local left=$((BUDGET_S - SECONDS - 5))
  if [ "$left" -lt 30 ]; then echo "$name: skipped (${left}s of the budget left)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local device=cuda extra=("$@")
  if [ "$DRY_RUN" = 1 ]; then  # a CPU builds the full-size model slowly: no per-step limit but the budget
    arch=sd15 res=64 dtype=fp32 device=cpu extra=(--repeats 1 --text-layers 1) limit=$left
  fi
  timeout "$limit" $py -m difffeat bench "$suite" --arch "$arch" --resolution "$res" --dtype "$dtype" --device "$device" \
    "${extra[@]}" --out "$OUT/$name.json" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after ${SECONDS}s; $(tr -d ' \n' < "$OUT/$name.json" 2>/dev/null | grep -o '"vs_bare_forward":{[^}]*}\|"vs_batch_1":{[^}]*}\|"memory_mb":{[^}]*}' | tr '\n' ' ')"
}
bench bench_sd15_goca_512_cuda_fp16 75 goca sd15 512 fp16
bench bench_sd15_throughput_512_cuda_fp16 75 throughput sd15 512 fp16
bench bench_sdxl_goca_1024_cuda_bf16 120 goca sdxl 1024 bf16
bench bench_sdxl_throughput_1024_cuda_bf16 100 throughput sdxl 1024 bf16 --repeats 2
bench bench_sdxl_goca_1536_cuda_bf16 90 goca sdxl 1536 bf16 --repeats 1
bench bench_sdxl_goca_2048_cuda_bf16 90 goca sdxl 2048 bf16 --repeats 1
tar -czf "$OUT/logs.tgz" -C "$LOGS" .
ls -la "$OUT"
