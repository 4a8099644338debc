"""Test data, not tests: the vendored projects carry test suites of their own, which the tests
that use them run in their own copies."""

collect_ignore = ["oracle_project"]
