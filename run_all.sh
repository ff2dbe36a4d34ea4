#!/usr/bin/env bash
# The main job: run every notebook in order, headless, and print the wall time of each.
#
#   ./run_all.sh
#
# `jupyter execute` (from nbclient) runs each notebook in its own folder and writes nothing back,
# so the committed notebooks stay output-free. The mode comes from CLIP_HINDI_MODE (quick|full); unset, clip_utils.Config.from_env
# picks full on a CUDA machine and quick otherwise. Figures land in images/, the synthetic data
# in data/quick/, checkpoints in runs/. Quick mode takes about 4-5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
export TQDM_DISABLE="${TQDM_DISABLE:-1}"  # progress bars are noise in a log
PYTHON="${PYTHON:-python3}"

mode="$("$PYTHON" -c 'import clip_utils; print(clip_utils.Config.from_env().mode)')"
echo "mode: $mode"

now() { date +%s.%N; }
total_start="$(now)"
for notebook in notebooks/[0-9][0-9]_*.ipynb; do
    start="$(now)"
    if ! "$PYTHON" -m jupyter execute --kernel_name=python3 --timeout=900 "$notebook"; then
        echo "FAILED: $notebook (after $(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s)" >&2
        exit 1
    fi
    awk -v name="$(basename "$notebook")" -v a="$start" -v b="$(now)" \
        'BEGIN { printf "%-28s %6.1f s\n", name, b - a }'
done
awk -v a="$total_start" -v b="$(now)" 'BEGIN { printf "%-28s %6.1f s\n", "total", b - a }'
