"""`python -m memcli`: the same as the `memcli` command."""

from .cli import main

if __name__ == "__main__":
    main()
