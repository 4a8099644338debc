"""Secrets never reach training: a scanner for the texts a pair is made of.

Recorded prompts, suffixes and texts are the developers' own files, and files hold credentials.
A pair that carries one would teach the adapter to write it out for anybody, so the pair builder
drops every record in which this scanner finds something (dropped, not masked: a masked key
still teaches the shape of the code around it).

Two layers:

* **detect-secrets** (Yelp's maintained scanner) with its pattern plugins: AWS keys, private-key
  blocks, credentials in URLs, JWTs, GitHub/GitLab/Slack/Stripe/... tokens, and ``password =
  "..."``-style assignments. Its own high-entropy plugins are left out: scanning free text
  (not a file it can parse) they flag every word of a docstring;
* **high-entropy runs**: a run of at least ``min_length`` base64/url-safe characters that mixes
  upper case, lower case and digits and whose Shannon entropy reaches ``base64_entropy`` bits a
  character, or a run of at least ``hex_min_length`` hex digits with both letters and digits
  (generated keys and tokens, whatever their provider).

Findings carry the kind and line only, never the matched text, so they can be logged and stored.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["SecretFinding", "SecretScanner", "shannon_entropy"]

_ScanLine = Callable[[str], Iterable[Any]]

# Plugins that judge text by entropy (replaced by our own check) or flag what is no secret.
_EXCLUDED_PLUGINS = frozenset(
    {"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"}
)
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{16,}={0,2}")
_HEX_RUN = re.compile(r"(?<![0-9A-Za-z/])[0-9a-fA-F]{16,}(?![0-9A-Za-z])")
# A URL's scheme, host and path (not its query, where tokens travel): commit links and
# documentation paths are long and mixed but public. Credentials in a URL's authority are
# detect-secrets' BasicAuthDetector's job, which sees the whole line.
_URL_PATH = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"]+")
_SEQUENTIAL = 5  # "ABCDE", "01234": an alphabet or a digit table, not a key


@dataclass(frozen=True)
class SecretFinding:
    kind: str  # detect-secrets' type ("AWS Access Key", ...) or "High Entropy String"
    line: int  # 1-based line of the scanned text


def shannon_entropy(text: str) -> float:
    """Bits per character of ``text``'s own character distribution."""
    if not text:
        return 0.0
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


class SecretScanner:
    """Finds credentials in text: detect-secrets' pattern plugins plus high-entropy runs.

    >>> SecretScanner().find("key = 'AKIAIOSFODNN7EXAMPLE'")[0].kind
    'AWS Access Key'
    """

    def __init__(
        self,
        *,
        min_length: int = 20,
        base64_entropy: float = 4.2,
        hex_min_length: int = 32,
    ) -> None:
        if min_length < 8 or hex_min_length < 8:
            raise ValueError("min_length and hex_min_length must be at least 8 characters")
        if not 0 < base64_entropy <= 6:
            raise ValueError(f"base64_entropy is bits per character, in (0, 6]: {base64_entropy}")
        self.min_length = min_length
        self.base64_entropy = base64_entropy
        self.hex_min_length = hex_min_length

    def find(self, text: str) -> list[SecretFinding]:
        """Every finding in ``text``, by line."""
        return self.find_many([text])[0]

    def find_many(self, texts: Sequence[str]) -> list[list[SecretFinding]]:
        """Findings for each of ``texts`` (one settings set-up for all of them: it is slow)."""
        with _detect_secrets() as scan_line:
            return [self._find(text, scan_line) for text in texts]

    def _find(self, text: str, scan_line: _ScanLine) -> list[SecretFinding]:
        found: list[SecretFinding] = []
        for number, line in enumerate(text.splitlines(), 1):
            kinds = {secret.type for secret in scan_line(line)}
            if self._high_entropy(line):
                kinds.add("High Entropy String")
            found += [SecretFinding(kind=kind, line=number) for kind in sorted(kinds)]
        return found

    def _high_entropy(self, line: str) -> bool:
        line = _URL_PATH.sub(" ", line)
        for match in _BASE64_RUN.finditer(line):
            run = match.group(0).rstrip("=")
            if (
                len(run) >= self.min_length
                and any(c.isupper() for c in run)
                and any(c.islower() for c in run)
                and any(c.isdigit() for c in run)
                and shannon_entropy(run) >= self.base64_entropy
                and not _sequential(run)
            ):
                return True
        for match in _HEX_RUN.finditer(line):
            run = match.group(0)
            if (
                len(run) >= self.hex_min_length
                and any(c.isdigit() for c in run)
                and any(c.isalpha() for c in run)
                and not _sequential(run)
            ):
                return True
        return False


def _sequential(run: str) -> bool:
    """Whether ``run`` holds ``_SEQUENTIAL`` consecutive characters in code-point order."""
    streak = 1
    for a, b in zip(run, run[1:], strict=False):
        streak = streak + 1 if ord(b) == ord(a) + 1 else 1
        if streak >= _SEQUENTIAL:
            return True
    return False


@contextmanager
def _detect_secrets() -> Iterator[_ScanLine]:
    """detect-secrets' ad-hoc line scanner under our plugin set (its settings are global: they
    are set for the block and restored after)."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.core.scan import scan_line
    from detect_secrets.settings import transient_settings

    plugins = [
        {"name": cls.__name__}
        for cls in get_mapping_from_secret_type_to_class().values()
        if cls.__name__ not in _EXCLUDED_PLUGINS
    ]
    with transient_settings({"plugins_used": plugins}):
        yield scan_line
