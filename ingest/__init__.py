"""edgelabel ingest: the plant-side service that writes what appliances publish over MQTT into PostgreSQL.

A separate package on purpose: a plant server runs it next to its historian, without cameras, models or
the daemon's runtime.  It imports only small shared pieces of ``edgelabel.edge`` (``redact`` for logs,
``config`` helpers for ``${VAR}`` and YAML errors); never the pipeline, sources, sinks or engines
(``tests/test_ingest.py`` checks that in a fresh interpreter).
"""

from __future__ import annotations

__all__ = ["IngestConfig", "load_ingest_config"]

from edgelabel.ingest.config import IngestConfig, load_ingest_config
