"""The one exception type for mistakes a user can fix (bad path, bad file, wrong setting).

Entry points catch it and print its message as a single line with a non-zero exit code, so a
user sees what to change instead of a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file or key and the fix."""
