"""netplug: a Docker network driver plugin with pluggable backends."""

__version__ = "0.1.0"
