"""Built-in data: ShapesWorld (shapes/), voice queries (voice.py), the bundled tokenizer (tokenizer.py),
readers of users' files, and the metrics that score answers against the world (metrics.py)."""


class InputError(ValueError):
    """Bad user input: a file, key or value, and what was expected. Every reader in data/ and every script
    raises this one type; the scripts' error handler prints it as one line and exits with status 2."""
