"""pytest-kaizen: report Kaizen completions' test outcomes (see :mod:`pytest_kaizen.plugin`)."""

__version__ = "0.1.0"
