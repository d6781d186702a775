#!/usr/bin/env bash
# One device call's worth of GPU work: kernel tests, then the benchmarks.
# Run from the repo root on the GPU machine with the .device bundle carried:
#     bash scripts/gpu_suite.sh [tests] [gemv] [sampling] [attention] [bench] [offline] [serving] [control]
# Logs and JSON land in $OUT (or ./gpu-out when OUT is unset).
set -o pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
[ -f .device/activate.sh ] && source .device/activate.sh
mkdir -p /tmp/zp && ln -sfn "$PWD" /tmp/zp/ziggurat
export PYTHONPATH=/tmp/zp:$PYTHONPATH PYTHONUNBUFFERED=1
MODEL8B=${MODEL8B:-/tmp/llama8b}
want() { [[ " $STEPS " == *" $1 "* ]]; }
STEPS=" $* "
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if want tests; then
  timeout ${TESTS_S:-300} python -m pytest tests/gpu -q -p no:cacheprovider -rf > "$OUT/tests.log" 2>&1; tail -40 "$OUT/tests.log"
fi
if want gemv; then
  timeout ${GEMV_S:-300} python -m ziggurat.scripts.bench_gemv ${GEMV_ARGS:-} --json "$OUT/gemv.json" 2>&1 \
    | tee "$OUT/gemv.log"
fi
if want sampling; then
  timeout ${SAMPLING_S:-120} python -m ziggurat.scripts.bench_sampling ${SAMPLING_ARGS:-} --json "$OUT/sampling.json" 2>&1 \
    | tee "$OUT/sampling.log"
fi
if want attention; then
  timeout ${ATTN_S:-200} python -m ziggurat.scripts.bench_attention ${ATTN_ARGS:-} --json "$OUT/attention.json" 2>&1 \
    | tee "$OUT/attention.log"
fi
if [ ! -d "$MODEL8B" ] && { want bench || want serving; }; then
  python -m ziggurat.models.maker "$MODEL8B" --arch llama --preset llama-3.1-8b --dtype bfloat16 \
    --device cuda 2>&1 | tail -3
fi
if want bench; then
  timeout ${BENCH_S:-420} python -m ziggurat.scripts.bench_gpu --model "$MODEL8B" --dtype bfloat16 \
    ${BENCH_ARGS:---hf} --json "$OUT/bench_gpu${TAG}.json" 2>&1 | tee "$OUT/bench_gpu${TAG}.log"
fi
if want offline; then
  timeout ${OFFLINE_S:-300} python -m ziggurat.scripts.bench_offline ${OFFLINE_ARGS:---make qwen3:qwen3-0.6b --dtype bfloat16 --hf} \
    --json "$OUT/bench_offline.json" 2>&1 | tail -20 | tee "$OUT/bench_offline.log"
fi
if want serving; then
  timeout ${SERVING_S:-420} python -m ziggurat.scripts.bench_serving_sweep --model "$MODEL8B" --dtype bfloat16 \
    ${SERVING_ARGS:---rates 1 4 16 inf --num-prompts 64} --json "$OUT/serving.json" 2>&1 | tail -40 | tee "$OUT/serving.log"
fi
if want control; then
  timeout ${CONTROL_S:-240} python -m ziggurat.scripts.bench_control_plane ${CONTROL_ARGS:---ingresses 4} \
    --json "$OUT/control.json" 2>&1 | tail -20 | tee "$OUT/control.log"
fi
