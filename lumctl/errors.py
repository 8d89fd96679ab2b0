"""Errors that end a command with exit code 2 and one line naming the file and field."""


class InputError(Exception):
    """Bad user input: a spec, a data file, or a store. The CLI prints `str(e)` and exits 2."""

    def __init__(self, where: str, what: str):
        self.where = where
        self.what = what
        super().__init__(f"{where}: {what}")
