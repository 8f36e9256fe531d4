#!/usr/bin/env bash
# Real-scale figures on a lent CUDA machine, in one call (about 8 minutes on an H100/H200-class GPU):
# full-size SD1.5 at 512 px fp16 and SDXL at 1024 px bf16, random weights (configs/architectures), via
# `difffeat bench SUITE --arch ARCH --device cuda`:
#   1. goca: segment time split vs the bare forward, kept maps, CUDA allocator peak over a bare forward;
#   2. throughput: images/s of batched segmentation at batch 1, 4, 8 (target: batch 8 >= 3x batch 1);
#   3. SDXL goca at 1536 and 2048 px: CUDA peak memory at high resolution (each step bounded by a timeout,
#      so an out-of-memory or slow step leaves the others' JSON).
# Usage: bash benchmarks/gpu_real_scale.sh OUT_DIR   (then commit OUT_DIR/*.json under benchmarks/results/)
set -uo pipefail
OUT=${1:?usage: gpu_real_scale.sh OUT_DIR}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
py=python3
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; uptime
  $py -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } > "$OUT/env.txt" 2>&1
bench() {  # NAME TIMEOUT_S ARGS...
  local name=$1 limit=$2; shift 2
  timeout "$limit" $py -m difffeat bench "$@" --device cuda --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? $(tail -c 300 "$OUT/$name.json" 2>/dev/null | tr -d '\n' | tail -c 200)"
}
bench bench_sd15_goca_512_cuda_fp16 90 goca --arch sd15 --resolution 512 --dtype fp16
bench bench_sd15_throughput_512_cuda_fp16 90 throughput --arch sd15 --resolution 512 --dtype fp16
bench bench_sdxl_goca_1024_cuda_bf16 120 goca --arch sdxl --resolution 1024 --dtype bf16
bench bench_sdxl_throughput_1024_cuda_bf16 120 throughput --arch sdxl --resolution 1024 --dtype bf16 --repeats 2
bench bench_sdxl_goca_1536_cuda_bf16 60 goca --arch sdxl --resolution 1536 --dtype bf16 --repeats 1
bench bench_sdxl_goca_2048_cuda_bf16 60 goca --arch sdxl --resolution 2048 --dtype bf16 --repeats 1
ls -la "$OUT"
