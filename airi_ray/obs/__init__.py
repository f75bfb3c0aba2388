"""Metric definitions of airi (names prefixed ``airi_``)."""
