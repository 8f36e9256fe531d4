#!/usr/bin/env bash
# One session on a lent CUDA machine, as run for the figures in README "GPU" and the shapes model card:
#   1. `difffeat bench goca --device cuda` at 512 and 768 px (GPU otherwise idle),
#   2. shapes-model training runs (RUNS, default "A B C"; recipes below) side by side on the one GPU, each
#      bounded by a wall-clock budget (--minutes) and exported, then scored by the model-quality benchmark's
#      attention and generation parts on CUDA (EVAL_S seconds at most; 0 skips it),
#   3. the `gpu`-marked tests (tests/test_gpu.py) while the runs train (they check agreement, not speed).
# Usage: [RUNS="A B C"] [FROM=pipeline-folder] [BATCH=256] [EVAL_S=200 (0: no evaluation)] [CHECKS=1] bash benchmarks/gpu_session.sh OUT_DIR [MINUTES_PER_RUN]
# Writes OUT_DIR/<run>.tgz (the exported pipeline folder) and OUT_DIR/logs.tgz (logs, JSON, sample grids).
set -uo pipefail
OUT=${1:?usage: gpu_session.sh OUT_DIR [MINUTES]}
MIN=${2:-5}
W=runs/gpu
mkdir -p "$W" "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"  # benchmarks/ import difffeat
py=python3

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  $py -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1; } > "$W/env.txt" 2>&1

CHECKS=${CHECKS:-1}  # 0: skip the benchmark and the gpu tests (a training-only session)
[ "$CHECKS" = 1 ] && for res in 512 768; do
  timeout 120 $py -m difffeat bench goca --device cuda --resolution "$res" --out "$W/bench_goca_cuda_$res.json" > "$W/bench_$res.log" 2>&1
done

# Recipes (all on the shipped VAE): A continues a pipeline folder (default: the shipped model) with its own
# objective; B is a fresh UNet with a frozen random text encoder and no attention supervision; C is B with the
# attention-localisation loss. FROM=<folder> makes every recipe start from that pipeline instead.
FROM=${FROM:-difffeat/weights/shapes}
RUNS=${RUNS:-A B C}
BATCH=${BATCH:-256}
common=(--steps 1000000 --minutes "$MIN" --batch "$BATCH" --decoder-steps 0 --min-snr-gamma 5 --latents mean)
recipe() {
  case $1 in
    A) echo --init-from "$FROM" --lr 4e-4 --attn-loss 0.25 --attn-loss-kind match_pixel --attn-loss-background ;;
    B) echo --init-from "$FROM" --init-vae-only --freeze-text --lr 8e-4 ;;
    C) echo --init-from "$FROM" --init-vae-only --freeze-text --lr 8e-4 --attn-loss 0.25 --attn-loss-kind match --attn-loss-background ;;
    *) echo "unknown recipe $1" >&2; return 1 ;;
  esac
}
chain() {  # run name = recipe name
  local name=$1
  # shellcheck disable=SC2046  # recipe() prints whitespace-separated arguments without spaces inside
  $py -m difffeat.devtools.train_shapes --out "$W/$name" "${common[@]}" $(recipe "$name") --export "$W/$name/shapes" > "$W/$name.log" 2>&1 &&
    [ "${EVAL_S:-200}" -gt 0 ] && timeout "${EVAL_S:-200}" $py benchmarks/shapes_model_quality.py --model "$W/$name/shapes" --device cuda --threads 4 \
      --parts attn,gen --gen-per-class 16 --out "$W/$name/quality.json" --save-grid "$W/$name/samples.png" >> "$W/$name.log" 2>&1
}
for name in $RUNS; do chain "$name" & done

[ "$CHECKS" = 1 ] && timeout 240 $py -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$W/gpu_tests.log" 2>&1
wait

for name in $RUNS; do
  [ -d "$W/$name/shapes" ] && tar czf "$OUT/$name.tgz" -C "$W/$name" shapes
done
tar czf "$OUT/logs.tgz" "$W"/*.txt "$W"/*.log "$W"/*.json "$W"/*/quality.json "$W"/*/samples.png "$W"/*/log.jsonl \
  "$W"/*/export_report.json 2>/dev/null
ls -la "$OUT"
