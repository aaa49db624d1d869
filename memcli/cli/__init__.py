"""The command line: parse, call the backend, render with Rich."""
