#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU: the CUDA-marked tests (of the files named below,
# so a test-only package missing on the GPU machine cannot abort collection), whole-model decode at
# an 8B shape against the roofline (perf/decode_roofline.py: tok/s over batch {1,16,64,256} x
# context {512,4096} under CUDA graphs and eagerly, GPU vs host time, the attention kernel, memory
# headroom), the paged attention kernels alone, then the transparency, pooling and adaptive
# benchmarks (quick variants; adaptive's throttled scenario is CPU-only), each writing its JSON into
# the folder given as $1. Budget: the timeouts sum to 530 s (680 s with perf/tp.py, on two GPUs or more;
# tests/test_gpu_check.py checks the single-GPU sum).
#
#   perf/gpu_check.sh OUT_DIR
#
# Python packages missing on the GPU machine (msgspec, pyzmq, opentelemetry-*, ...) can be carried
# as wheels in ./.whl; they are installed into /tmp/site first.
set -uo pipefail
out=${1:?usage: perf/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:$PWD/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1
status=0
tests="tests/test_model.py tests/test_streaming.py tests/test_triton_attention.py tests/test_triton_host_pages.py"
# shellcheck disable=SC2086
timeout 150 $py -m pytest -q -m cuda -p no:cacheprovider $tests 2>&1 | tee "$out/cuda_tests.log" || status=1
timeout 100 $py perf/decode_roofline.py > "$out/decode_roofline.json" 2> "$out/decode_roofline.err" || status=1
timeout 45 $py perf/attention_kernels.py > "$out/attention_kernels.json" 2> "$out/attention_kernels.err" || status=1
timeout 75 $py perf/transparency.py --quick > "$out/transparency.json" 2> "$out/transparency.err" || status=1
timeout 70 $py perf/pooling.py --quick > "$out/pooling.json" 2> "$out/pooling.err" || status=1
timeout 90 $py perf/adaptive.py --quick --pairs 3 > "$out/adaptive.json" 2> "$out/adaptive.err" || status=1
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then  # tensor parallelism needs a GPU per rank
  timeout 150 $py perf/tp.py --quick > "$out/tp.json" 2> "$out/tp.err" || status=1
fi
tail -n 3 "$out"/*.json
exit $status
