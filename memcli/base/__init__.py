"""Leaf utilities every layer may use: paths, the clock format. Imports no other memcli package."""
