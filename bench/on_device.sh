#!/usr/bin/env bash
# Every GPU figure of the closing notes in one call on a lent GPU machine (bare image: its own python3 and torch).
# Carried: .whl (open_clip_torch and the few packages that image lacks). Figures and logs land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/hnclip-bench}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, open_clip; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'open_clip', open_clip.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout 300 python3 bench/train_step.py --device cuda --real-size --batch-size 128 --steps 20 --threads 8 \
    2>&1 | tee "$OUT/train_step.txt"
timeout 170 python3 bench/vqa_infer.py --device cuda --real-size --n-questions 64 --batch-size 16 \
    --max-new-tokens 16 --json-out "$OUT/vqa_infer.json" 2>&1 | tee "$OUT/vqa_infer.txt"
