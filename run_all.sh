#!/usr/bin/env bash
# The main job: run every notebook in order, headless, and print the wall time of each.
#
#   ./run_all.sh
#
# `jupyter execute` (from nbclient) runs each notebook in its own folder and writes nothing back,
# so the committed notebooks stay output-free. The mode comes from CLIP_HINDI_MODE (quick|full); unset, clip_utils.Config.from_env
# picks full on a CUDA machine and quick otherwise. Figures land in images/, the synthetic data
# in data/quick/, checkpoints in runs/. Quick mode takes about 7 minutes on 2 CPU cores. Each cell may run
# CLIP_HINDI_CELL_TIMEOUT seconds (default 900); a full-mode GPU run needs more: set it to -1 (no limit).
set -euo pipefail
cd "$(dirname "$0")"
export TQDM_DISABLE="${TQDM_DISABLE:-1}"  # progress bars are noise in a log
PYTHON="${PYTHON:-python3}"

mode="$("$PYTHON" -c 'import clip_utils; print(clip_utils.Config.from_env().mode)')"
echo "mode: $mode"

total_start="$(date +%s.%N)"
for notebook in notebooks/[0-9][0-9]_*.ipynb; do
    # Wall time and peak memory (the largest process: the notebook's kernel) of each notebook.
    "$PYTHON" - "$notebook" <<'EOF'
import os, resource, subprocess, sys, time
from pathlib import Path

start = time.time()
result = subprocess.run([sys.executable, "-m", "jupyter", "execute", "--kernel_name=python3", f"--timeout={os.environ.get('CLIP_HINDI_CELL_TIMEOUT', 900)}", sys.argv[1]])
seconds, peak_mb = time.time() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"{Path(sys.argv[1]).name:28s} {seconds:6.1f} s   peak memory {peak_mb:5.0f} MB", flush=True)
if result.returncode:
    sys.exit(f"FAILED: {sys.argv[1]}")
EOF
done
awk -v a="$total_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%-28s %6.1f s\n", "total", b - a }'
