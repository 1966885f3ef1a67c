#!/usr/bin/env bash
# Everything issue 9 needs from a GPU, in ONE device call (about 9 minutes at most):
#   1. environment facts (nvidia-smi, torch / triton / CUDA versions);
#   2. the CUDA tests: pytest -m gpu (the fused Triton kernel and the chunked kernel
#      against float64, and every other gpu-marked test);
#   3. the GPU benchmark: python -m dist_infonce.bench --device cuda (bf16; dense,
#      OpenCLIP, Inf-CL, chunked, triton; B = 16k..1M at D = 512, 64k at D = 1024).
# Results land in $OUT (the device tool's output folder; ./gpu_results elsewhere):
#   env.txt, pytest_gpu.log, bench.log, bench_gpu.png, bench/bench.json, bench/table.md
# (6 files; bench.json is rewritten after every row, so a cut-short run keeps its rows,
# and --redraw then writes its table and plot).
#
# From this machine, with the device tool, after `bash scripts/fetch_gpu_wheels.sh`:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Then copy $OUT's bench_gpu.png to docs/bench_gpu.png and its table into the README.
# Time limits (seconds) can be moved: PYTEST_S (default 200), BENCH_S (330); extra
# benchmark arguments go in BENCH_ARGS (e.g. "--sizes 16384,65536 --modes sym", or
# "--triton-variants 64x256x16,128x128x8" to time other tile / D-slice / warp choices
# of the fused kernel side by side; scripts/triton_compile_check.py shows their
# registers and spills without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET  # the CUDA tests must compile, not interpret
SITE=""
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
fi
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi || true
  python3 - << 'PY'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
for dist in ("triton", "inf-cl", "open_clip_torch", "info-nce-pytorch", "matplotlib"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "MISSING")
PY
} 2>&1 | tee "$OUT/env.txt"

echo "== pytest -m gpu (limit ${PYTEST_S:-200} s)"
timeout "${PYTEST_S:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider \
  --continue-on-collection-errors tests 2>&1 | tee "$OUT/pytest_gpu.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.log"

echo "== benchmark (limit ${BENCH_S:-330} s)"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments on purpose
timeout "${BENCH_S:-330}" python3 -m dist_infonce.bench --device cuda --repeats 3 \
  --time-budget 15 --timeout 90 --out "$OUT/bench" --plot "$OUT/bench_gpu.png" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
if [ ! -s "$OUT/bench/table.md" ] && [ -s "$OUT/bench/bench.json" ]; then
  # Cut short by the time limit: the table and plot of the rows it measured.
  python3 -m dist_infonce.bench --redraw "$OUT/bench/bench.json" --out "$OUT/bench" \
    --plot "$OUT/bench_gpu.png" 2>&1 | tee -a "$OUT/bench.log"
fi
