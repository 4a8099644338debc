"""Reading, merging and locating ledger entries."""

from __future__ import annotations

import json
from pathlib import Path

from kaizen_client.ledger import LedgerEntry, locate, merge_entries, read_ledger

from tests.plugins.fake_kaizen import ledger_entry


def entry(completion_id: str, text: str, **fields: object) -> LedgerEntry:
    return LedgerEntry.from_dict(ledger_entry(completion_id, text, **fields))  # type: ignore[arg-type]


def write_lines(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- reading ---------------------------------------------------------------------------------


def test_last_line_per_completion_and_choice_wins(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "ledger.jsonl",
        json.dumps(ledger_entry("cmpl-a", "one", updated_at="2026-11-22T10:00:00Z")),
        json.dumps(ledger_entry("cmpl-b", "two")),
        json.dumps(ledger_entry("cmpl-a", "one edited", updated_at="2026-11-22T09:00:00Z")),
        json.dumps(ledger_entry("cmpl-a", "other choice", choice_index=1)),
    )
    entries = {e.key: e for e in read_ledger(path)}
    assert set(entries) == {("cmpl-a", 0), ("cmpl-b", 0), ("cmpl-a", 1)}
    # The file's order decides, not the timestamps: the editor appends as it goes.
    assert entries[("cmpl-a", 0)].current_text == "one edited"


def test_malformed_lines_are_skipped_with_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    good = json.dumps(ledger_entry("cmpl-ok", "return 1"))
    path.write_bytes(
        b"{not json\n"
        + good.encode()
        + b"\n\n"
        + json.dumps({"completion_id": "cmpl-x"}).encode()  # fields missing
        + b"\n"
        + json.dumps(ledger_entry("cmpl-y", "x", updated_at="yesterday")).encode()
        + b"\n\xff\xfe\n"  # not UTF-8
        + b"[1, 2]\n"
    )
    warnings: list[str] = []
    entries = read_ledger(path, warn=warnings.append)
    assert [e.completion_id for e in entries] == ["cmpl-ok"]
    assert len(warnings) == 1
    assert "skipped 5 malformed lines" in warnings[0] and "line 1" in warnings[0]


def test_missing_ledger_is_empty(tmp_path: Path) -> None:
    warnings: list[str] = []
    assert read_ledger(tmp_path / "nope.jsonl", warn=warnings.append) == []
    assert warnings == []


def test_entry_round_trip_and_tolerated_forms() -> None:
    data = ledger_entry("cmpl-a", "x = 1", start_offset=4)
    assert LedgerEntry.from_dict(data).to_dict() == data
    no_current = {k: v for k, v in data.items() if k != "current_text"}
    assert LedgerEntry.from_dict(no_current).current_text == "x = 1"
    naive = LedgerEntry.from_dict({**data, "updated_at": "2026-11-22T10:00:00"})
    assert naive.updated == LedgerEntry.from_dict(data).updated


# --- merging ---------------------------------------------------------------------------------


def test_merge_newer_update_wins_and_ties_keep_the_first_source() -> None:
    local = [
        entry("cmpl-a", "local a", updated_at="2026-11-22T10:00:00Z"),
        entry("cmpl-b", "local b", updated_at="2026-11-22T12:00:00+02:00"),  # 10:00 UTC
        entry("cmpl-c", "local c", updated_at="2026-11-22T10:00:00Z"),
    ]
    remote = [
        entry("cmpl-a", "remote a", updated_at="2026-11-22T10:00:01Z"),
        entry("cmpl-b", "remote b", updated_at="2026-11-22T10:00:00Z"),
        entry("cmpl-c", "remote c", updated_at="2026-11-22T09:59:59Z"),
        entry("cmpl-d", "remote d"),
    ]
    merged = {e.completion_id: e.current_text for e in merge_entries(local, remote)}
    assert merged == {
        "cmpl-a": "remote a",
        "cmpl-b": "local b",
        "cmpl-c": "local c",
        "cmpl-d": "remote d",
    }


def test_a_newer_removal_wins_over_an_older_active_entry(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src/calc.py").write_text("def f():\n    return 1\n")
    local = [entry("cmpl-a", "return 1", updated_at="2026-11-22T10:00:00Z")]
    remote = [entry("cmpl-a", "return 1", state="removed", updated_at="2026-11-22T11:00:00Z")]
    assert locate(merge_entries(local, remote), tmp_path) == []


# --- locating --------------------------------------------------------------------------------

SOURCE = """\
def add(a, b):
    return a + b


def twice(a):
    return a + a


def again(a, b):
    return a + b
"""


def project(tmp_path: Path, text: str = SOURCE, name: str = "src/calc.py") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return tmp_path


def test_current_text_is_preferred(tmp_path: Path) -> None:
    root = project(tmp_path)
    [found] = locate([entry("cmpl-a", "return a * b", current_text="return a + a")], root)
    assert found.matched == "current_text"
    assert found.final_text == "return a + a"
    assert (found.start_line, found.end_line) == (6, 6)
    assert found.path == (root / "src/calc.py").resolve()


def test_inserted_text_is_the_fallback(tmp_path: Path) -> None:
    root = project(tmp_path)
    [found] = locate([entry("cmpl-a", "return a + a", current_text="return 2 * a")], root)
    assert found.matched == "inserted_text"
    assert found.final_text == "return a + a"
    assert found.start_line == 6


def test_not_found_is_not_covered(tmp_path: Path) -> None:
    root = project(tmp_path)
    assert locate([entry("cmpl-a", "return a ** b", current_text="return b ** a")], root) == []


def test_duplicates_resolve_to_the_occurrence_nearest_the_offset(tmp_path: Path) -> None:
    root = project(tmp_path)
    second = SOURCE.rindex("return a + b")
    near_second = locate([entry("cmpl-a", "return a + b", start_offset=second - 3)], root)
    assert [f.start_line for f in near_second] == [10]
    assert near_second[0].offset == second
    near_first = locate([entry("cmpl-a", "return a + b", start_offset=0)], root)
    assert [f.start_line for f in near_first] == [2]
    no_offset = locate([entry("cmpl-a", "return a + b")], root)
    assert [f.start_line for f in no_offset] == [2]


def test_multi_line_spans(tmp_path: Path) -> None:
    root = project(tmp_path)
    text = "def twice(a):\n    return a + a\n"
    [found] = locate([entry("cmpl-a", text)], root)
    assert (found.start_line, found.end_line) == (5, 6)
    assert list(found.lines) == [5, 6]
    [found] = locate([entry("cmpl-b", "a + b\n\n\ndef twice(a):")], root)
    assert (found.start_line, found.end_line) == (2, 5)


def test_removed_missing_blank_and_escaping_entries_are_ignored(tmp_path: Path) -> None:
    root = project(tmp_path / "root")
    (tmp_path / "outside.py").write_text("return a + b\n")
    warnings: list[str] = []
    entries = [
        entry("cmpl-removed", "return a + b", state="removed"),
        entry("cmpl-missing", "return a + b", file_path="src/gone.py"),
        entry("cmpl-blank", "   \n", current_text=""),
        entry("cmpl-escape", "return a + b", file_path="../outside.py"),
        entry("cmpl-abs", "return a + b", file_path=str(tmp_path / "outside.py")),
        entry("cmpl-ok", "return a + b", file_path="./src/calc.py"),
    ]
    found = locate(entries, root, warn=warnings.append)
    assert [f.entry.completion_id for f in found] == ["cmpl-ok"]
    assert len(warnings) == 1 and "outside the repository" in warnings[0]


def test_crlf_files_match_ledger_texts_with_lf(tmp_path: Path) -> None:
    root = project(tmp_path, SOURCE.replace("\n", "\r\n"))
    [found] = locate([entry("cmpl-a", "def twice(a):\n    return a + a")], root)
    assert (found.start_line, found.end_line) == (5, 6)
    assert found.final_text == "def twice(a):\n    return a + a"


def test_non_ascii_text(tmp_path: Path) -> None:
    root = project(tmp_path, 'def greet():\n    return "héllo wörld ✓"\n')
    [found] = locate([entry("cmpl-a", 'return "héllo wörld ✓"')], root)
    assert found.start_line == 2
