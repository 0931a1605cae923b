"""User-facing errors (the CLI prints the message and exits 2) and warnings (printed as one line), and the
two helpers their messages share for counts and lists of names."""


class TaskvecError(Exception):
    """A problem with the user's input. The message names the file/tensor and says what to do."""


class TaskvecWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one line."""


def counted(n: int, noun: str) -> str:
    """'1 tensor', '3 tensors': a count with its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def name_list(items, k: int = 5) -> str:
    """The first `k` of `items`, comma-separated, and how many more there are."""
    items = list(items)
    return ", ".join(items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")
