"""The one exception type whose message the CLI shows as a single line."""

from __future__ import annotations


class WhalefastError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # fastai prefixes an exception raised in a callback with where it happened, over two lines;
        # the user needs the one line that says what is wrong.
        return self.message


class StorageError(WhalefastError):
    """A write that failed for want of space or permission: the old file is still there, whole."""
