"""The one exception type whose message the CLI shows as a single line."""


class WhalefastError(Exception):
    """A problem with the user's input or environment, explained in one line."""
