#!/usr/bin/env bash
# Upscale every image of a folder, two ways. Usage: examples/upscale_folder.sh IN_DIR OUT_DIR [MODEL]
set -euo pipefail
in_dir=${1:?input folder}
out_dir=${2:?output folder}
model=${3:-realesrgan-x4plus}

# 1. One process for the whole folder (the model loads once): the fast way.
srkit upscale "$in_dir" -o "$out_dir" --model "$model" --skip-existing

# 2. A shell loop, one file per call: the exit code tells which file failed.
for f in "$in_dir"/*.png; do
  srkit upscale "$f" -o "$out_dir/loop" --model "$model" --quiet || echo "failed: $f" >&2
done
