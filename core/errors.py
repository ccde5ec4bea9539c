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


class TrainingDiverged(UserError):
    """A training loss or the weights became NaN/inf. The run stops before anything non-finite is saved;
    the checkpoints written before stay as they are (resume from them with a lower learning rate)."""

    def __init__(self, what: str, step: int, hint: str = "lower --lr"):
        super().__init__(
            f"training diverged at step {step}: {what} is not finite; {hint} (earlier checkpoints are kept)"
        )
