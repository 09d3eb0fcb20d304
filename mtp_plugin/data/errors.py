"""The one error type of `mtp_plugin.data`."""


class DataError(SystemExit):
    """A user-fixable problem with inputs or tokenizer files, as one line naming the file and the fix.

    A `SystemExit` so that `python -m mtp_plugin.data` ends with that line and status 1 instead of a
    traceback; callers in Python can still catch it by name.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
