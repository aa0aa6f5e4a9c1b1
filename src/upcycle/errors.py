"""One exception type for mistakes a user can fix; the CLI prints it as one line."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment that the user can fix. The message says what to fix."""
