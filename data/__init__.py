"""Built-in data: ShapesWorld (shapes.py), voice queries (voice.py), the bundled tokenizer (tokenizer.py)."""
