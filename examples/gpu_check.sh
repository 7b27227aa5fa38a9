#!/usr/bin/env bash
# One device call: the model benchmark on the GPU, then the suite with the GPU as torch's default
# device (FBCOMPILE_TEST_DEVICE, see tests/conftest.py), then bp with inductor-compiled feedback, then
# mixed precision (every configuration and the baseline under torch.autocast bfloat16).
# `bash examples/gpu_check.sh [test paths]`.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python3 examples/bench_gpu.py --batches 32,256 --rounds 10 --configs bp,dtp,dfa,drtp,drtp-in-step 2>&1 | tee $OUT/bench_gpu.md
FBCOMPILE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -n 14 -p no:warnings -p no:cacheprovider \
  --timeout=90 "${@:-tests}" -rf > $OUT/suite_cuda.log 2>&1
echo "suite exit: $?"
grep -E "^(FAILED|ERROR)" $OUT/suite_cuda.log | cut -c1-220 | head -60
tail -3 $OUT/suite_cuda.log
timeout 120 python3 examples/bench_gpu.py --models resnet18 --batches 256 --configs bp,bp+inductor --rounds 10 2>&1 \
  | tee $OUT/bench_gpu_inductor.md
timeout 90 python3 examples/bench_gpu.py --models resnet18 --batches 256 --configs bp,dfa,drtp --rounds 10 \
  --autocast bfloat16 2>&1 | tee $OUT/bench_gpu_autocast.md
