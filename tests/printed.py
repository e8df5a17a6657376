"""Comparison at a printed precision (Stata's output)."""


def close(value, printed):
    """|value - printed| <= half a unit in the last printed decimal of ``printed``."""
    s = f"{printed}"
    decimals = len(s.split(".")[1]) if "." in s else 0
    return abs(value - printed) <= 0.5 * 10 ** (-decimals) + 1e-15
