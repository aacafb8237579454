"""Conformance checks (filled in below)."""
