"""The one exception type for mistakes a user can fix (bad path, bad file, wrong setting).

Entry points catch it and print its message as a single line with a non-zero exit code, so a
user sees what to change instead of a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file or key and the fix."""


def cause(exc: BaseException, limit: int = 300) -> str:
    """``"Class: first line"`` of the innermost exception ``exc`` was raised from, at most ``limit``
    characters: the part of a library error that says what is wrong, for a one-line message.

    Wrappers (torch.compile's ``BackendCompilerFailed``, DataLoader re-raises) put a headline such
    as "backend='inductor' raised:" first and the reason in the exception they chain from.
    """
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{exc.__class__.__name__}: {lines[0]}" if lines else exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
