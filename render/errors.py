"""The one exception type whose message reaches the user as-is.

It lives in `render`, the lowest package (tracking reads video through render, retarget
uses both), so that all three packages can raise it without breaking the one-way flow
video -> tracking -> retarget -> render.
"""


class RetargetError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits non-zero; it never shows a traceback
    for this type. Raise it with a message that names the file or option at fault and,
    where possible, what to do about it.
    """


class DiskFullError(RetargetError):
    """The disk filled up while a file was being written (the partial file is already removed)."""
