"""The one error type of `mtp_plugin.data`."""


class DataError(ValueError):
    """A user-fixable problem with inputs or tokenizer files, as one line naming the file and the fix.

    `python -m mtp_plugin.data` prints it as `error: <message>` and exits 2, as the training app does
    for bad input; a ValueError so that callers validating inputs (the training app) report it the same
    way they report a bad setting.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
