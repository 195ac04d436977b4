#!/usr/bin/env bash
# GPU check of the native TensorRT back end (needs an NVIDIA GPU, TensorRT and pycuda or cuda-python).
#
# Builds an FP16 engine for ../shared/models/yolox_nano.onnx into a fresh cache, loads it a second time
# (cache hit), runs it and ONNX Runtime (CPU) on every image in ../shared/images, and compares the
# detections one to one: same class, IoU >= 0.95, |score difference| <= 0.01; fails below 98% matched.
# Prints the build time, the second-start load time and the figures.
#
#   scripts/gpu_check.sh                       # defaults above
#   scripts/gpu_check.sh --precision fp32      # any option of scripts/gpu_check.py
#
# Exit codes: 0 parity holds, 1 parity below the threshold, 2 setup failure, 3 no GPU/TensorRT here.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -e /dev/nvhost-ctrl-gpu ] && [ ! -e /dev/nvidiactl ]; then
    echo "SKIP: no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidiactl or Jetson GPU device)"
    exit 3
fi
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import tensorrt" >/dev/null 2>&1; then
    echo "SKIP: TensorRT's Python bindings are not importable by $PYTHON"
    echo "      (Jetson: sudo apt install python3-libnvinfer; x86: pip install tensorrt)"
    exit 3
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
exec "$PYTHON" scripts/gpu_check.py "$@"
