"""The review app (`whalefast serve`): the review logic (logic.py), its web pages (app.py) and their guard (guard.py). It may import every layer below the CLI."""
