"""Fuzz tests: the decoders and the router service against hostile input (see conftest.py)."""
