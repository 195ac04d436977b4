"""edgelabel daemon core: config, sources, pipeline, label records, sinks, CLI."""

__version__ = "0.1.0"
