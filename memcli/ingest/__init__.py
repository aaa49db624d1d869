"""Documents to text to chunks: discovery, extraction by format, chunking."""
