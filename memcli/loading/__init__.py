"""Checkpoints to models: config, weights, converted copies, the catalog, tokenizers and prompt formats."""
