#!/usr/bin/env bash
# The one prepared GPU check of ggtorch's Triton path (issue 25), for a bare GPU machine with its own
# PyTorch and Triton, no network and only this repository: it makes its models there (ggtorch's GGUF
# writer, random blocks), checks the compiled kernels and the models' logits against the CPU float32
# exact path, then prints the speed table (1.1B synthetic in Q4_0, Q4_K_M, Q8_0) and writes it under
# $OUT (gpu_check.md, gpu_check.json, gpu_check.log). Exit code 0 when every check passed.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine (< 8 minutes)
#   bash benchmarks/gpu_check.sh --cpu-dry-run            # here: tiny shapes in Triton's interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ggtorch-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
"$PY" -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())' || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
# hard limit: the whole check must fit a short device lease (the CPU dry run, in Triton's interpreter,
# takes 8-9 minutes on 2 cores and gets 20)
LIMIT=460
for arg in "$@"; do [ "$arg" = "--cpu-dry-run" ] && LIMIT=1200; done
timeout "${GPU_CHECK_TIMEOUT:-$LIMIT}" "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
