"""The one error type the command line turns into a single readable line.

Raise `SaofuError` (a `ValueError`) for bad input a user can fix: a missing folder, an empty
class folder, an unreadable image, an unknown model name. The message must name the thing.
"""


class SaofuError(ValueError):
    """Bad input or state that a user can fix; the CLI prints it as one line, no traceback."""
