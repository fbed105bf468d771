#!/usr/bin/env bash
# The CUDA path end to end on a lent GPU machine (device tool), in one call:
#   the gpu-marked tests, then bench_scale on the 7B shape with --device cuda.
# Needs, carried from the checkout: .whl (wheels for the machine's Python 3.12 of what its image lacks or holds in
# another version; on 2026-12-04, for this venv's transformers 5.25.0: transformers, peft 0.21.2, gguf, regex,
# huggingface_hub 2.4.0, httpx2, httpcore2, truststore, click 8.5.1, kernels; bitsandbytes for the NF4 tests) and
# .devcarry/tokenizer (SmolLM2's tokenizer, saved with save_pretrained). Both ignored via .git/info/exclude.
#   LAYERS="4" CONFIGS="data-free;text;default" TESTS=1 bash benchmarks/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, peft, lowrank_compress; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, torch.cuda.is_available())" || exit 1
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TEST_S:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
fi
timeout "${BENCH_S:-240}" python3 benchmarks/bench_scale.py --layers "${LAYERS:-4}" --configs "${CONFIGS:-data-free;text;default}" \
  --device cuda --tokenizer .devcarry/tokenizer --tmp /tmp --out gpu-scale 2>&1 | tee "$OUT/gpu-scale.log"
cp benchmarks/results/gpu-scale.json "$OUT/" 2>/dev/null
exit 0
