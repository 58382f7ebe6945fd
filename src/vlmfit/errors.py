"""One exception type for mistakes in what the user gave us (config, files, data), rendered as one clear message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with user input: says what is wrong, where (file, key, row) and how to fix it.

    The CLI prints it as a single message and exits with code 2; the Python API lets it propagate.
    """

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        self.what, self.where, self.hint = what, where, hint
        super().__init__(self.render())

    def render(self) -> str:
        msg = f"{self.where}: {self.what}" if self.where else self.what
        if self.hint:
            msg += f"\n  hint: {self.hint}"
        return msg


def nearest(name: str, valid: Iterable[str]) -> str | None:
    """The closest valid name to a misspelt one, or None when nothing is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return match[0] if match else None
