"""Small shared helpers: atomic writes, precision choice, progress."""
