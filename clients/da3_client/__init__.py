"""Async Python client for da3-serve (no Ray dependency)."""
