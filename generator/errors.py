"""The one exception type users see: a clear paragraph naming the file, field or flag."""


class GeneratorError(Exception):
    """A user-facing error. The message is one paragraph: what was wrong, where, what was expected."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n{hint}")
