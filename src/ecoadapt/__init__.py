"""ecoadapt: adapt a pretrained language model to a new domain, and measure what it costs."""

__version__ = "0.1.0"
