#!/usr/bin/env bash
# Retrain the bundled demo model (models/demo) on one CUDA GPU in about 9 minutes, then evaluate it
# on the held-out photos. Every phase starts from the bundled weights and has a time budget
# (--minutes), so the run ends on time on any card; the card records the steps that fitted.
#
#   scripts/train_demo_gpu.sh OUT_DIR [PLASMA_ROOT]
#
# OUT_DIR/model is the new model directory (float16 safetensors, each <= 16 MB), OUT_DIR/eval its
# held-out table; checkpoints go to $FLOWIE_TRAIN_CHECKPOINTS (default OUT_DIR/checkpoints).
# PLASMA_ROOT is where Debian's plasma-workspace-wallpapers is installed or unpacked (default /):
#   apt-get download plasma-workspace-wallpapers && dpkg -x plasma-workspace-wallpapers_*.deb ROOT
# Needs torch with CUDA, diffusers, scikit-image, safetensors, Pillow and tqdm; no network.
# docs/DEMO_MODEL.md ("Retraining on a GPU") explains the choices; check the result on the CPU with
# `flowie eval --model OUT_DIR/model --images skimage-holdout --record-in-card` before shipping it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/train_demo_gpu.sh OUT_DIR [PLASMA_ROOT]}
plasma=${2:-/}
checkpoints=${FLOWIE_TRAIN_CHECKPOINTS:-$out/checkpoints}
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
  'no CUDA device: this recipe is for a GPU (docs/DEMO_MODEL.md has the CPU one)')"
cores=$(nproc)
data_workers=$(( cores > 4 ? cores - 2 : 2 ))
mkdir -p "$out"
python3 -m service.cli train --images "skimage-photos+plasma-photos=$plasma" --init-from models/demo \
  --out "$out/model" --checkpoint-dir "$checkpoints" \
  --device cuda --bf16 --data-workers "$data_workers" --threads 2 --seed 0 \
  --steps swinir=100000,vae=100000,cond_encoder=4000,flow=100000 \
  --minutes swinir=3,vae=2,cond_encoder=0.5,flow=2 \
  --batch swinir=48,vae=64,cond_encoder=64,flow=128 \
  --crop swinir=256,vae=128,cond_encoder=128,flow=128 \
  --lr swinir=4e-4,vae=5e-4,cond_encoder=2e-4,flow=2e-4 \
  --flow-bank 8192 --checkpoint-every 500 --weights-dtype float16
python3 -m service.cli eval --model "$out/model" --images skimage-holdout --device cuda --out "$out/eval"
