"""whalefast: identify individual humpback whales from photos of their tail flukes."""

__version__ = "0.1.0"

NEW_WHALE = "new_whale"
