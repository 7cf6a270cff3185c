"""joblet-persist: durable, compressed storage and queries for joblet job output and metrics."""

__version__ = "0.1.0"
