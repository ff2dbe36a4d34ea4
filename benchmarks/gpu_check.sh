#!/usr/bin/env bash
# GPU check, ready to run on a machine with 1+ GPUs and no network (NOT yet run: no GPU was available).
# Every step has a timeout, 7.5 minutes in all. Prints full-size training samples/s and peak memory,
# ours (fp32 and mixed precision) against the published loop; loader-only images/s at 224 px (decoding
# every epoch and the decode-once cache, with fit's 2 workers) to set against the model's samples/s;
# with 2+ GPUs, a 2-process quick-mode fit under `accelerate launch` (DDP + global negatives) so its
# seconds per epoch can be set against one process's.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 MPLBACKEND=Agg
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $GPUS"
for precision in fp32 auto; do
  timeout 110 python benchmarks/train_throughput.py --config full --device cuda --steps 20 --precision "$precision" \
    || echo "train_throughput --precision $precision failed or timed out (exit $?)"
done
timeout 60 python benchmarks/loader_throughput.py --photos 200 --rounds 2 --workers 2 \
  || echo "loader_throughput failed or timed out (exit $?)"
if [ "$GPUS" -ge 2 ]; then
  for n in 1 2; do
    start=$(date +%s)
    timeout 80 accelerate launch --num_processes "$n" -m clip_utils.train --mode quick --epochs 1 \
      --batch-size 64 --out-dir "runs/gpu_check_$n" --data-dir data/quick \
      || echo "the $n-process launch failed or timed out (exit $?)"
    echo "processes=$n: $(( $(date +%s) - start ))s for 1 quick epoch (start-up included)"
  done
fi
