"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single `error: ...` line and exits with code 2; anything else
is a bug in lorakit and exits 1 with its traceback. Subclassing ValueError keeps library callers
who already catch ValueError working.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Iterator, Optional, Union


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
    written = exc.filename2 or exc.filename  # (a copy's error names its source first, the file it wrote second)
    where = f" writing {written}" if written else ""
    return UserError(f"{_FULL[exc.errno]}{where}: free some space there, or write elsewhere (earlier outputs are intact)")


@contextlib.contextmanager
def writing(path: Union[str, Path]) -> Iterator[None]:
    """Give an OSError raised while writing `path` the file's name, where it has none (a write's or a
    close's error names no file), so that a full disk is said with where it was met."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
