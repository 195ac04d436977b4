"""Packaging for edgelabel.

ONNX Runtime (CPU) and a headless pip OpenCV are installed by default so the
daemon works out of the box.  On a Jetson, JetPack already provides a
GStreamer-enabled OpenCV and a GPU ONNX Runtime from NVIDIA's wheel index;
installing pip's copies would shadow them.  Set, at install time:

  EDGELABEL_SYSTEM_OPENCV=1          do not depend on opencv-python-headless
  EDGELABEL_ORT_PACKAGE=<name|none>  onnxruntime (default), onnxruntime-gpu, or none

What to install:

  pip install .              the daemon and its CLI only (runtime dependencies below)
  pip install ".[jetson]"    plus what a Jetson needs beyond that: pycuda (TensorRT itself comes with
                             JetPack / NVIDIA's wheels); ``gpu`` is the same extra under its old name
  pip install ".[ingest]"    plus the PostgreSQL driver for `edgelabel ingest` (the plant-side service)
  pip install ".[test]"      plus the test tooling: pytest, hypothesis, ruff, onnx, Playwright (browser
                             tests), Schemathesis (API fuzzing), Datumaro (export read-back, which pulls
                             pandas and pyarrow): close to 1 GB, never needed to run the daemon
"""

import os

from setuptools import find_packages, setup

ROOT_PACKAGE = "edgelabel"
TOP_FOLDERS = ("edge", "engines", "web", "ingest")

ort_package = os.environ.get("EDGELABEL_ORT_PACKAGE", "onnxruntime").strip()
system_opencv = os.environ.get("EDGELABEL_SYSTEM_OPENCV", "").strip().lower() in ("1", "true", "yes")

install_requires = [
    "numpy>=1.23",
    "PyYAML>=6.0",
    "paho-mqtt>=2.0,<3",
    "flask>=3.0",
    "tqdm>=4.60",
    "waitress>=2.1",
    "prometheus-client>=0.17",
    "pycocotools>=2.0.7",  # COCO mAP for `edgelabel eval` and the INT8 accuracy gate
    "scipy>=1.10",  # the tracker's optimal assignment (linear_sum_assignment)
]
if ort_package and ort_package != "none":
    install_requires.append(f"{ort_package}>=1.16")
if not system_opencv:
    install_requires.append("opencv-python-headless>=4.8")
#: a Jetson beyond the runtime: CUDA buffers for native TensorRT (JetPack brings TensorRT and OpenCV)
jetson_requires = ["pycuda>=2022.1"]

setup(
    name="edgelabel",
    version="0.1.0",
    description="Edge auto-labeling appliance: TensorRT/ONNX detectors on cameras and files, labels over MQTT and on disk",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The repository keeps edge/, engines/ and web/ at its top; installed, they live under one import root,
    # edgelabel.*, so that nothing claims the generic names edge, engines or web in site-packages.
    packages=[f"{ROOT_PACKAGE}.{name}" for name in find_packages(include=[f"{top}*" for top in TOP_FOLDERS])],
    package_dir={f"{ROOT_PACKAGE}.{top}": top for top in TOP_FOLDERS},
    package_data={
        f"{ROOT_PACKAGE}.edge": ["schemas/*.json", "configs/*.yaml"],
        f"{ROOT_PACKAGE}.web": ["templates/*.html", "static/*", "openapi.yaml"],
        f"{ROOT_PACKAGE}.ingest": ["migrations/*.sql"],
    },
    install_requires=install_requires,
    extras_require={
        "jetson": jetson_requires,
        "gpu": jetson_requires,  # the earlier name of "jetson", kept for existing install commands
        "test": ["pytest>=7", "jsonschema>=4", "ruff>=0.5", "onnx>=1.14", "playwright>=1.40", "cryptography>=41",
                 "hypothesis>=6.100", "schemathesis>=4.0,<5",
                 "datumaro>=1.13,<2", "motmetrics>=1.4", "psycopg[binary]>=3.1",
                 "minio>=7.2", "moto[server]>=5"],  # moto_server: the S3-compatible server the frames test runs
        # `edgelabel ingest`: the plant-side service that writes what the appliances publish into PostgreSQL
        # (minio: the frame store's S3 client, frames.store: s3)
        "ingest": ["psycopg[binary]>=3.1", "minio>=7.2"],
        # bench/tracking.py: MOT metrics and a library tracker to compare with (never in the runtime install)
        "bench": ["motmetrics>=1.4", "supervision>=0.26,<0.31"],  # ByteTrack is gone from supervision 0.31
    },
    entry_points={"console_scripts": [f"edgelabel={ROOT_PACKAGE}.edge.cli:main"]},
)
