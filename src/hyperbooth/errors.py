"""The one user-facing error type."""

import sys
from collections.abc import Callable


class HyperboothError(Exception):
    """A problem with the user's input: the message is one line naming it and the fix."""


def run_module(main: Callable[[], object], prog: str) -> None:
    """Run a `python -m` entry point: a HyperboothError is one line on stderr and exit status 2."""
    try:
        main()
    except HyperboothError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
