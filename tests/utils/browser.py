"""A real Chromium for browser tests: Debian's ``chromium`` package driven by Playwright
(``pip install playwright``, in the ``dev`` extra), never a browser Playwright downloads.

The ``chromium`` session fixture installs the package with apt-get when /usr/bin/chromium is
missing and the tests run as root; otherwise (not root, no apt-get, no network to the Debian
mirrors, no playwright) the tests that use it skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_TIMEOUT_S = 900


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", *args],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )


def _tail(text: str) -> str:
    return " | ".join(text.strip().splitlines()[-3:])


def ensure_chromium() -> Path:
    """/usr/bin/chromium, installed from Debian's repositories if missing; skips if it cannot."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and installing it needs root: apt-get install chromium")
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and this system has no apt-get to install it")
    result = _apt("install", "-y", "--no-install-recommends", "chromium")
    if result.returncode != 0:  # a fresh container has no package lists yet
        _apt("update")
        result = _apt("install", "-y", "--no-install-recommends", "chromium")
    if result.returncode != 0 or not CHROMIUM.exists():
        pytest.skip(f"apt-get install chromium failed: {_tail(result.stderr or result.stdout)}")
    return CHROMIUM


@pytest.fixture(scope="session")
def chromium() -> Path:
    return ensure_chromium()


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Any]:
    """A headless Chromium (Playwright's sync API) for one test module. Not for the session:
    while Playwright's sync API runs it holds an event loop running on the main thread, and
    every later test that calls ``asyncio.run`` would fail ("cannot be called from a running
    event loop")."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        # Root has no user namespaces for Chromium's sandbox in a container.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = playwright.chromium.launch(executable_path=str(chromium), args=args)
        try:
            yield launched
        finally:
            launched.close()
