"""memcli: a local language model with a persistent, self-updating memory (MemoryLLM / M+)."""

__version__ = "0.1.0"
