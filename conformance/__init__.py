"""Conformance suite for zoo plugins (populated by the conformance issue)."""
