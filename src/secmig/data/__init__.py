"""Bundled data: the demo scenario."""
