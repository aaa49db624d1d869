"""Pools as data: a memory state saved to and loaded from the store, and its metadata."""
