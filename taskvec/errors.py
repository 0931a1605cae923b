"""One exception type for user-facing errors: the CLI prints its message and exits 2."""


class TaskvecError(Exception):
    """A problem with the user's input. The message names the file/tensor and says what to do."""
