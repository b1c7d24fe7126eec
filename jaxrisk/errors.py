"""The one error type users see: bad input, named with its file and field."""


class InputError(ValueError):
    """Bad user input (a file, a field, a shape). The CLI prints it without a traceback."""
