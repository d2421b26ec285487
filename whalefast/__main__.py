"""Entry point for `python -m whalefast` (and `accelerate launch -m whalefast`)."""

from whalefast.cli import app

if __name__ == "__main__":
    app()
