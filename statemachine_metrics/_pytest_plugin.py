"""The pytest plugin (placeholder, being written)."""
