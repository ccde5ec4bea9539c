"""The project's user-facing error: bad input, reported in one line with exit code 2."""


class UserError(Exception):
    """Raised for bad input (a missing file, a wrong option value, an incompatible artifact).

    `main.py` prints its message on one line and exits with code 2, without a traceback.
    Bugs raise anything else and keep their traceback.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
