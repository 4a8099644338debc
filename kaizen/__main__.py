"""``python -m kaizen``: the same as the ``kaizen`` command."""

from kaizen.cli import app

app()
