"""ddump: a distributed tcpdump."""

__version__ = "0.1.0"
