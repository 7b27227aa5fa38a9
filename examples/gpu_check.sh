#!/usr/bin/env bash
# One device call: the model benchmark on the GPU, then the CUDA-capable test files (device via env).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 95 python3 examples/bench_gpu.py --batches 32,256 --rounds 10 2>&1 | tee $OUT/bench_gpu.md
FBCOMPILE_TEST_DEVICE=cuda timeout 65 python3 -m pytest -q -n 14 -p no:warnings -p no:cacheprovider --timeout=60\
  tests/test_runtime_direct.py tests/test_runtime_error.py tests/test_runtime_target.py tests/test_verify.py\
  tests/test_mono_forward.py tests/test_rules_norm.py tests/test_rules_conv.py tests/test_rules_pool.py tests/test_losses.py -rf > $OUT/suite_cuda.log 2>&1
tail -40 $OUT/suite_cuda.log
