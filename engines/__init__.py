"""Inference back ends and model decoders.

This package never imports from ``edge`` or ``web``: it turns an image into
detections and knows nothing about sources, records or sinks.  Back ends are
selected by a ``type`` key and imported lazily, so a machine without TensorRT
or CUDA never touches those libraries.
"""

from edgelabel.engines.base import Detection, Engine, EngineError, TensorSpec, create_engine

__all__ = ["Detection", "Engine", "EngineError", "TensorSpec", "create_engine"]
