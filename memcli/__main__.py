"""`python -m memcli`: the same as the `memcli` command."""

from memcli.cli.main import main

if __name__ == "__main__":
    main()
