"""One exception type for every user-facing error: the CLI prints its message, not a traceback."""


class SlimtuneError(Exception):
    """A problem the user can fix: the message says where (file:line:field) and what to do."""


_LOCATORS: dict = {}


def register_locator(name: str, locate) -> None:
    """Rows of the source `name` are numbered over several files; `locate(row) -> (file, line)`."""
    _LOCATORS[name] = locate


class DataError(SlimtuneError):
    """Bad input data. Built with the place it was found, so the message always names it."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        if path in _LOCATORS and line is not None:  # a row of several files: name its own file and line
            path, line = _LOCATORS[path](line)
        self.path, self.line, self.field, self.message = path, line, field, message
        where = ":".join(str(x) for x in (path, line) if x is not None)
        if field:
            where = f"{where} field '{field}'" if where else f"field '{field}'"
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(SlimtuneError):
    """A bad config key or value; the message lists the valid choices."""
