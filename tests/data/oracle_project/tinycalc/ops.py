"""Small arithmetic helpers."""


def add(a, b):
    """The sum of ``a`` and ``b``."""
    return a + b


def scale(values, factor):
    """Each value times ``factor``."""
    return [v * factor for v in values]


def clamp(x, low, high):
    """``x`` limited to the interval from ``low`` to ``high``."""
    return max(low, min(x, high))
