"""The one exception type for mistakes a user can fix (a missing input, an impossible combination of settings).

Front ends print its message on one line and exit with status 2 — never a traceback. The message names what is
wrong (the config key and file, the record id, the folder) and, where another stage produces the missing thing, the
command that does. Anything else that goes wrong is a bug or a fault and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what and how."""


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind ``exc``: itself, or the cause Ray wraps it in (a task, actor or Train worker raised it)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__
    return None
