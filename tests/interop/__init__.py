"""Interop suite (see conftest.py)."""
