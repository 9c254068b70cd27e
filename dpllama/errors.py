"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""


class DpllamaError(Exception):
    """A problem with the user's input or environment, with a message that names it
    (file, field, expected vs found)."""
