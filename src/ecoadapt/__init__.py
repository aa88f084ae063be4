"""ecoadapt: adapt a pretrained language model to a new domain, and measure what it costs."""

from importlib import metadata

try:
    __version__ = metadata.version("ecoadapt")  # one source: pyproject.toml
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
