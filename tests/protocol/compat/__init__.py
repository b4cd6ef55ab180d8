"""Frozen copies of earlier protocol versions' message definitions, one module each."""
