#!/usr/bin/env bash
# Correctness of the CUDA paths and a first look at throughput, on a GPU machine.
set -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_model.py 2>&1 | tail -5
