"""The command line: parse, call the backend (in this process or a running server), render with Rich.

    app.py         the typer app and groups, options before or after the command, errors -> exit codes
    backends.py    the backend a command goes through, chosen once
    output.py      stdout/stderr, tables, JSON        progress.py   progress displays
    interrupts.py  Ctrl-C and SIGTERM                 completion.py shell completion
    inject.py ask.py chat.py pools.py config.py models.py serve.py eval.py log.py: the commands
    main.py        the console script
"""
