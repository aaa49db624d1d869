"""The model core: the transformer (model.py, the reference), its fast paths, quantization, the memory state and the engine. torch lives here."""
