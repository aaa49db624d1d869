"""The library facade (Memcli), settings, asking, injecting, evaluation, the log of answers."""
