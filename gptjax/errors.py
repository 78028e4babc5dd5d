"""The one exception type for bad user input."""


class UserError(Exception):
    """A problem with the user's input (config, data, workdir), reported as one line.

    The CLI prints `error: <message>` and exits with a non-zero status; nothing
    on disk is changed. Messages name the problem and the fix.
    """
