"""``python -m s2split`` and the ``s2split`` command.

:func:`entry` imports the command line itself, so that Ctrl-C while the
interpreter is still importing (the first fraction of a second) ends with
one line and status 130 too, not a traceback.
"""

import sys


def entry() -> None:
    try:
        from .cli.parser import main
        code = main()
    except KeyboardInterrupt:
        try:
            sys.stderr.write("s2split: interrupted\n")
        except (OSError, ValueError):
            pass
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    entry()
