"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single `error: ...` line and exits with code 2; anything else
is a bug in lorakit and exits 1 with its traceback. Subclassing ValueError keeps library callers
who already catch ValueError working.
"""

from __future__ import annotations

import errno
from typing import Optional


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a data record, a mismatched adapter.

    The message must name the bad value, where it came from (file:line or config key) and the fix.
    """


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def disk_full(exc: BaseException) -> Optional[UserError]:
    """A write that failed on a full disk (or quota) as the one-line error it is for the user; None
    for any other error. What lorakit writes goes to a temporary name first, so what an earlier
    write left stays whole."""
    if not isinstance(exc, OSError) or exc.errno not in _FULL:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return UserError(f"{_FULL[exc.errno]}{where}: free some space there, or write elsewhere (earlier outputs are intact)")
