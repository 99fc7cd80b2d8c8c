"""The one user-facing error type."""


class HyperboothError(Exception):
    """A problem with the user's input: the message is one line naming it and the fix."""
