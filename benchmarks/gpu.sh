#!/usr/bin/env bash
# gradflow on a GPU, in one short script (issue 20, item 7): the CUDA tests, the tutorial on CUDA,
# the monitor's cost per step on CUDA (ratios measured side by side in one process) and its
# host-memory overhead. Prints the card's name first; every figure comes with it. Under 8 minutes
# on one H100 with torch's CUDA build; run from the repository root, with the project installed
# (pip install -e '.[test]').
#
#     bash benchmarks/gpu.sh 2>&1 | tee gpu.log
set -uo pipefail
cd "$(dirname "$0")/.."
python - <<'PY' || { echo "gpu.sh: no CUDA device visible to torch; nothing to measure"; exit 2; }
import torch
assert torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
echo "== the CUDA tests (they skip on a CPU machine)"
timeout 180 python -m pytest -q -p no:cacheprovider -k "cuda or CUDA" tests/experiments/test_train.py \
    tests/monitor/test_monitor_models.py tests/monitor/test_conversions.py tests/test_cli.py || status=1
echo "== the tutorial's deep ReLU on CUDA (50 epochs)"
timeout 120 python scripts/train.py configs/deep_relu.yaml train.epochs=50 --device cuda --logdir "$(mktemp -d)" \
    || status=1
echo "== the monitor's cost per step on CUDA, monitored / bare (3 interleaved rounds, wall clock)"
timeout 240 python benchmarks/overhead.py --device cuda --quick --clock wall \
    --models tutorial wide resnet_cnn transformer_lm lstm_lm nanogpt resnet18 || status=1
echo "== host memory the monitor adds (the models on the CPU: peak RSS over trainable bytes)"
timeout 150 python benchmarks/memory.py --repeats 1 --models big lora16 --allocators fine || status=1
exit $status
