"""The one exception type that user-facing code raises for bad input.

A ``Loc3rError`` carries a single clear line. The CLI prints it to stderr
without a traceback (``--debug`` shows the traceback) and exits non-zero.
"""


class Loc3rError(Exception):
    """A user-facing error: bad input, missing file, unsupported backend."""

    exit_code = 1

    def __init__(self, message: str):
        # Keep it one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split("\n")).strip())
