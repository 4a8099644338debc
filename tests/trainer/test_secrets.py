"""The secret scanner, and secrets in records: each kind is found, honest code is not flagged,
and a record or resampled text holding one never becomes a pair (dropped, counted, not
masked). The full path (records -> pairs.json -> selection -> trained batches) is in
tests/trainer/test_round.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.trainer.test_pairs import ASSERTION, GOOD, PREFIX, rec, triples, with_test
from trainer.pairs import build_pairs
from trainer.sandbox import Sandbox, SandboxLimits
from trainer.secrets import SecretScanner, shannon_entropy

# Kinds a developer's files do hold. Built from parts so this file itself is not a finding
# for scanners run over the repository.
AWS_KEY = "AKIA" + "Z3MHKQ7TQ2XW4BYF"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYzEXAMPLEKEY"
PRIVATE_KEY = (
    "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7bq\n-----END RSA PRIVATE KEY-----"
)
URL_PASSWORD = "postgres://deploy:" + "s3cr3t-Passw0rd@db.internal:5432/app"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    + ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
GENERIC_TOKEN = "q8Zr2LkP0vXw7NbT" + "4sYd9JcQ1mFh6GaE"

PLANTS = {
    "aws_key": f"    client = boto3.client('s3', aws_access_key_id='{AWS_KEY}')",
    "aws_secret": f"    aws_secret_access_key = '{AWS_SECRET}'",
    "private_key": f'    KEY = """{PRIVATE_KEY}"""',
    "url_password": f"    engine = create_engine('{URL_PASSWORD}')",
    "jwt": f"    headers = {{'Authorization': 'Bearer {JWT}'}}",
    "high_entropy": f"    API_TOKEN = {GENERIC_TOKEN}",
}
SECRET_STRINGS = (
    AWS_KEY,
    AWS_SECRET,
    "PRIVATE KEY",
    "s3cr3t-Passw0rd",
    JWT.split(".")[0],
    GENERIC_TOKEN,
)


@pytest.fixture(scope="module")
def scanner() -> SecretScanner:
    return SecretScanner()


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_each_planted_kind_is_found(scanner: SecretScanner, kind: str) -> None:
    text = "def handler(event):\n" + PLANTS[kind] + "\n    return 1\n"
    findings = scanner.find(text)
    assert findings, f"{kind} not found"
    assert {f.line for f in findings} >= {2}
    # A finding never carries the secret itself (it is logged and stored).
    assert all(s not in repr(findings) for s in SECRET_STRINGS)


def test_honest_code_is_not_flagged(scanner: SecretScanner) -> None:
    code = (
        "import hashlib\n\n"
        "ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'\n"
        "# see https://github.com/pallets/click/blob/0aec1168ac591e159baf6f61026d6ae322c53aaf/x.py\n"
        "def similar_elements(test_tup1, test_tup2):\n"
        "    return tuple(set(test_tup1) & set(test_tup2))\n\n"
        "def digest(data: bytes) -> str:\n"
        "    return hashlib.sha256(data).hexdigest()  # e.g. 'e3b0c442'\n"
        "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))\n"
    )
    assert scanner.find(code) == []


def test_mbpp_canonical_solutions_are_not_flagged(scanner: SecretScanner) -> None:
    """MBPP+ as it ships for the gate (honest code with docstrings and asserts): not one of
    its 301 tasks is flagged; a pair builder that drops honest code would be costly."""
    from trainer.tasks import read_mbpp_rows

    rows = read_mbpp_rows()
    texts = [f"{r['prompt']}\n{r['canonical_solution']}\n{r['assertion']}" for r in rows]
    flagged = [
        r["task_id"] for r, found in zip(rows, scanner.find_many(texts), strict=True) if found
    ]
    assert len(rows) > 300 and flagged == []


def test_entropy() -> None:
    assert shannon_entropy("") == 0.0
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy(GENERIC_TOKEN) > 4.2


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(timeout_s=5))


@pytest.mark.parametrize("where", ["prompt", "suffix", "final_text", "fixed_text"])
def test_a_record_holding_a_secret_never_pairs(sandbox: Sandbox, where: str) -> None:
    line = PLANTS["aws_key"].strip()
    if where == "prompt":
        records = [rec(GOOD, "passed", prompt=f"{line}\n{PREFIX}"),
                   rec(ASSERTION, "failed", prompt=f"{line}\n{PREFIX}")]  # fmt: skip
    elif where == "suffix":
        records = [rec(GOOD, "passed", suffix=f"\n{line}\n"),
                   rec(ASSERTION, "failed", suffix=f"\n{line}\n")]  # fmt: skip
    elif where == "final_text":
        records = [rec(f"{line}\n    return a + b", "passed"), rec(ASSERTION, "failed")]
    else:
        records = [rec(ASSERTION, "failed", fixed_text=f"return a + b  # {line}")]
    result = build_pairs(records, sandbox=sandbox)
    assert all(AWS_KEY not in p.prompt + p.chosen + p.rejected for p in result.pairs)
    dropped = result.funnel["records_dropped"]["secret"]
    assert dropped == (1 if where in ("final_text", "fixed_text") else 2)
    assert result.funnel["pairs"] == len(result.pairs) == 0


def test_a_resampled_secret_is_dropped(sandbox: Sandbox) -> None:
    leaked = f"return a + b  # {PLANTS['jwt'].strip()}"

    def policy(prompt: str, suffix: str | None, n: int) -> list[str]:
        return [leaked, GOOD]

    result = build_pairs(
        [rec(ASSERTION, "failed")], sandbox=sandbox, tests_for=with_test, resample=policy
    )
    assert triples(result) == {(GOOD, ASSERTION, "resample")}
    assert result.funnel["dropped"]["secret"] == 1


def test_scanning_can_be_replaced_but_is_on_by_default(sandbox: Sandbox) -> None:
    records = [rec(f"return a + b  # {GENERIC_TOKEN}", "passed"), rec(ASSERTION, "failed")]
    assert build_pairs(records, sandbox=sandbox).pairs == []
    # A stricter entropy floor (a team whose code is full of generated ids) lets it through.
    lenient = SecretScanner(base64_entropy=6.0)
    assert len(build_pairs(records, sandbox=sandbox, secret_scanner=lenient).pairs) == 1
    off = replace(records[0])
    assert len(build_pairs([off, records[1]], sandbox=sandbox, scan_secrets=False).pairs) == 1
