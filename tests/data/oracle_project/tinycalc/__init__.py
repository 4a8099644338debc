"""tinycalc: small arithmetic helpers."""

from tinycalc.ops import add, clamp, scale

__all__ = ["add", "clamp", "scale"]
