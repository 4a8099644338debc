"""Kaizen's CI-side client: what CI needs to report the fate of accepted completions.

- :mod:`kaizen_client.repository`: the repository id (normalised ``origin`` URL).
- :mod:`kaizen_client.ledger`: reading, merging and locating ledger entries.
- :mod:`kaizen_client.client`: ``GET /v1/ledger`` and ``POST /v1/outcomes``.
- :mod:`kaizen_client.spool`: keeping reports the server could not take, and resending them.
- :mod:`kaizen_client.report`: building the outcome report.
- :mod:`kaizen_client.wrapper`: the ``kaizen-report`` command for any CI job.

``plugins/PROTOCOL.md`` in the Kaizen repository is the contract with the server.
"""

__version__ = "0.1.0"
