"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single `error: ...` line and exits with code 2; anything else
is a bug in lorakit and exits 1 with its traceback. Subclassing ValueError keeps library callers
who already catch ValueError working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a data record, a mismatched adapter.

    The message must name the bad value, where it came from (file:line or config key) and the fix.
    """
