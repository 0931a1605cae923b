"""User-facing errors (the CLI prints the message and exits 2) and warnings (printed as one line)."""


class TaskvecError(Exception):
    """A problem with the user's input. The message names the file/tensor and says what to do."""


class TaskvecWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one line."""
