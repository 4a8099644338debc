import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { applyChange, findNearest, Ledger, LedgerEntry, locateInserted, parseJsonl, TextChange, toJsonl } from "../ledger";
import { random, T0 } from "./helpers";

const region = { start_offset: 10, current_text: "return a + b" }; // [10, 22)

describe("applyChange", () => {
  const cases: [string, TextChange, { effect: string; start_offset: number; current_text: string }][] = [
    ["insertion before: shifts", { offset: 2, length: 0, text: "xyz" }, { effect: "shifted", start_offset: 13, current_text: "return a + b" }],
    ["insertion right at the start: shifts, does not grow", { offset: 10, length: 0, text: "# " }, { effect: "shifted", start_offset: 12, current_text: "return a + b" }],
    ["insertion inside: edits", { offset: 20, length: 0, text: "(" }, { effect: "edited", start_offset: 10, current_text: "return a +( b" }],
    ["insertion right at the end: outside", { offset: 22, length: 0, text: "  # sum" }, { effect: "none", start_offset: 10, current_text: "return a + b" }],
    ["insertion after: nothing", { offset: 40, length: 0, text: "x" }, { effect: "none", start_offset: 10, current_text: "return a + b" }],
    ["deletion before: shifts back", { offset: 0, length: 4, text: "" }, { effect: "shifted", start_offset: 6, current_text: "return a + b" }],
    ["replacement before, same length: nothing moves", { offset: 0, length: 4, text: "abcd" }, { effect: "none", start_offset: 10, current_text: "return a + b" }],
    ["replacement inside", { offset: 19, length: 1, text: "-" }, { effect: "edited", start_offset: 10, current_text: "return a - b" }],
    ["deletion inside", { offset: 16, length: 4, text: "" }, { effect: "edited", start_offset: 10, current_text: "return b" }],
    ["deletion overlapping the start", { offset: 8, length: 9, text: "" }, { effect: "edited", start_offset: 8, current_text: "a + b" }],
    ["replacement overlapping the end", { offset: 20, length: 5, text: "c)" }, { effect: "edited", start_offset: 10, current_text: "return a +c)" }],
    ["deletion of exactly the region: removed", { offset: 10, length: 12, text: "" }, { effect: "removed", start_offset: 10, current_text: "" }],
    ["deletion around the region: removed", { offset: 5, length: 30, text: "" }, { effect: "removed", start_offset: 5, current_text: "" }],
    ["replacement of the region by other text: removed", { offset: 10, length: 12, text: "pass" }, { effect: "removed", start_offset: 10, current_text: "" }],
    ["replacement by text containing it (a reload): relocated", { offset: 0, length: 40, text: "# header\n\ndef f():\n    return a + b\n" }, { effect: "relocated", start_offset: 23, current_text: "return a + b" }],
  ];
  for (const [name, change, expected] of cases) {
    test(name, () => assert.deepEqual(applyChange(region, change), expected));
  }
});

/** A document and a ledger edited together. */
function editor(initial: string, ledger: Ledger, file = "src/calc.py") {
  let doc = initial;
  return {
    get text() {
      return doc;
    },
    edit(offset: number, length: number, text: string) {
      doc = doc.slice(0, offset) + text + doc.slice(offset + length);
      return ledger.applyChanges(file, [{ offset, length, text }]);
    },
  };
}

describe("Ledger", () => {
  const base = { repository: "github.com/acme/app", file_path: "src/calc.py" };

  test("an accepted completion becomes an active entry with the protocol's fields", () => {
    const ledger = new Ledger(() => T0);
    const entry = ledger.accept({ ...base, completion_id: "cmpl-1", text: "return a - b", start_offset: 19 });
    assert.deepEqual(entry, {
      completion_id: "cmpl-1",
      choice_index: 0,
      repository: "github.com/acme/app",
      file_path: "src/calc.py",
      inserted_text: "return a - b",
      current_text: "return a - b",
      start_offset: 19,
      state: "active",
      updated_at: "2026-11-22T10:00:00.000Z",
    });
  });

  test("edits before, inside and after the region keep current_text equal to the document's", () => {
    let now = T0;
    const ledger = new Ledger(() => now);
    const ed = editor("def add(a, b):\n    return a - b\n", ledger);
    ledger.accept({ ...base, completion_id: "cmpl-1", text: "return a - b", start_offset: 19 });
    now += 1000;
    assert.deepEqual(ed.edit(0, 0, "# calc\n").map((c) => c.effect), ["shifted"]);
    assert.equal(ledger.get("cmpl-1")!.start_offset, 26);
    assert.deepEqual(ed.edit(35, 1, "+").map((c) => c.effect), ["edited"]); // "-" -> "+"
    assert.equal(ledger.get("cmpl-1")!.current_text, "return a + b");
    assert.deepEqual(ed.edit(ed.text.length - 1, 0, "  # sum"), [], "typing after the region's end");
    const e = ledger.get("cmpl-1")!;
    assert.equal(ed.text.slice(e.start_offset, e.start_offset + e.current_text.length), "return a + b");
    assert.equal(e.inserted_text, "return a - b");
    assert.equal(e.updated_at, "2026-11-22T10:00:01.001Z", "two changes in one millisecond");
  });

  test("deleting the region marks it removed; later edits leave it alone", () => {
    const ledger = new Ledger(() => T0);
    const ed = editor("x = 1\nreturn a - b\ny = 2\n", ledger);
    ledger.accept({ ...base, completion_id: "cmpl-1", text: "return a - b", start_offset: 6 });
    const [change] = ed.edit(6, 13, ""); // the line and its newline
    assert.equal(change.effect, "removed");
    assert.equal(change.entry.state, "removed");
    assert.equal(change.entry.current_text, "");
    assert.deepEqual(ed.edit(0, 0, "zzz"), []);
    assert.equal(ledger.get("cmpl-1")!.start_offset, 6);
    assert.deepEqual(ledger.activeIn("src/calc.py"), []);
  });

  test("entries of other files are not touched", () => {
    const ledger = new Ledger(() => T0);
    ledger.accept({ ...base, file_path: "other.py", completion_id: "cmpl-1", text: "abc", start_offset: 5 });
    assert.deepEqual(ledger.applyChanges("src/calc.py", [{ offset: 0, length: 0, text: "x" }]), []);
    assert.equal(ledger.get("cmpl-1")!.start_offset, 5);
  });

  test("a multi-cursor edit (changes highest offset first) keeps every region right", () => {
    const ledger = new Ledger(() => T0);
    let doc = "aaa FIRST bbb SECOND ccc\n";
    ledger.accept({ ...base, completion_id: "c1", text: "FIRST", start_offset: 4 });
    ledger.accept({ ...base, completion_id: "c2", text: "SECOND", start_offset: 14 });
    // Cursors at 0, 10 (inside nothing), 16 (inside SECOND): VS Code reports them from the end.
    const changes = [
      { offset: 16, length: 0, text: "_" },
      { offset: 10, length: 0, text: "_" },
      { offset: 0, length: 0, text: "_" },
    ];
    for (const c of changes) doc = doc.slice(0, c.offset) + c.text + doc.slice(c.offset + c.length);
    ledger.applyChanges("src/calc.py", changes);
    for (const e of ledger.entries()) {
      assert.equal(doc.slice(e.start_offset, e.start_offset + e.current_text.length), e.current_text, e.completion_id);
    }
    assert.equal(ledger.get("c2")!.current_text, "SE_COND");
  });

  test("random edits: every active region's text is where the ledger says", () => {
    const rnd = random(42);
    for (let round = 0; round < 200; round++) {
      const ledger = new Ledger(() => T0);
      const ed = editor("0123456789".repeat(6), ledger);
      const inserted = "<completion>";
      const at = Math.floor(rnd() * 60);
      ed.edit(at, 0, inserted);
      ledger.accept({ ...base, completion_id: "c", text: inserted, start_offset: at });
      for (let step = 0; step < 15; step++) {
        const offset = Math.floor(rnd() * (ed.text.length + 1));
        const length = rnd() < 0.5 ? 0 : Math.floor(rnd() * Math.min(8, ed.text.length - offset + 1));
        const text = rnd() < 0.3 ? "" : "xy".slice(0, 1 + Math.floor(rnd() * 2));
        ed.edit(offset, length, text);
        const e = ledger.get("c")!;
        if (e.state === "removed") break;
        assert.equal(ed.text.slice(e.start_offset, e.start_offset + e.current_text.length), e.current_text, `round ${round} step ${step}`);
        assert.ok(e.current_text.length > 0);
      }
    }
  });

  test("dirty tracking: saved and pushed separately; a change during a push stays dirty", () => {
    let now = T0;
    const ledger = new Ledger(() => now);
    const ed = editor("....return x....", ledger);
    ledger.accept({ ...base, completion_id: "cmpl-1", text: "return x", start_offset: 4 });
    assert.equal(ledger.pendingSave().length, 1);
    const push = ledger.pendingPush();
    assert.equal(push.length, 1);
    ledger.markSaved(ledger.pendingSave());
    assert.equal(ledger.pendingSave().length, 0);
    now += 5;
    ed.edit(11, 1, "y"); // changed while the push was on its way
    ledger.markPushed(push);
    const again = ledger.pendingPush();
    assert.equal(again.length, 1, "the newer version still has to go");
    assert.equal(again[0].entry.current_text, "return y");
    assert.equal(ledger.pendingSave().length, 1);
    ledger.markPushed(again);
    assert.equal(ledger.pendingPush().length, 0);
  });

  test("updated_at only moves forward, even within one millisecond", () => {
    const ledger = new Ledger(() => T0);
    const ed = editor("abcdef", ledger);
    ledger.accept({ ...base, completion_id: "c", text: "cd", start_offset: 2 });
    ed.edit(3, 0, "x");
    ed.edit(3, 0, "y");
    assert.equal(ledger.get("c")!.updated_at, "2026-11-22T10:00:00.002Z");
  });

  test("renaming a file or a folder moves its entries", () => {
    const ledger = new Ledger(() => T0);
    ledger.accept({ ...base, file_path: "src/a.py", completion_id: "c1", text: "x", start_offset: 0 });
    ledger.accept({ ...base, file_path: "src/pkg/b.py", completion_id: "c2", text: "x", start_offset: 0 });
    ledger.accept({ ...base, file_path: "srcx/c.py", completion_id: "c3", text: "x", start_offset: 0 });
    assert.equal(ledger.renameFile("src", "lib"), 2);
    assert.deepEqual(ledger.entries().map((e) => e.file_path), ["lib/a.py", "lib/pkg/b.py", "srcx/c.py"]);
  });

  test("reconcile moves an entry to where its text now is", () => {
    const ledger = new Ledger(() => T0);
    ledger.accept({ ...base, completion_id: "c", text: "return a + b", start_offset: 4 });
    assert.deepEqual(ledger.reconcile("src/calc.py", "....return a + b"), []);
    const moved = ledger.reconcile("src/calc.py", "# new header\n....return a + b");
    assert.equal(moved[0].start_offset, 17);
    assert.deepEqual(ledger.reconcile("src/calc.py", "nothing here"), [], "not found: left for CI to search");
  });

  test("loading keeps the newer of two versions of an entry", () => {
    const ledger = new Ledger(() => T0);
    ledger.accept({ ...base, completion_id: "c", text: "mine", start_offset: 0 });
    const older = { ...ledger.get("c")!, current_text: "older", updated_at: "2026-11-22T09:00:00Z" };
    const newer = { ...ledger.get("c")!, current_text: "newer", updated_at: "2026-11-22T11:00:00Z" };
    assert.equal(ledger.load([older]), 0);
    assert.equal(ledger.get("c")!.current_text, "mine");
    assert.equal(ledger.load([newer]), 1);
    assert.equal(ledger.get("c")!.current_text, "newer");
  });
});

describe("JSON Lines", () => {
  const entry = (id: string, text: string, updated: string, state: "active" | "removed" = "active"): LedgerEntry => ({
    completion_id: id,
    choice_index: 0,
    repository: "github.com/acme/app",
    file_path: "src/app/util.py",
    inserted_text: "return a + b",
    current_text: text,
    start_offset: 120,
    state,
    updated_at: updated,
  });

  test("round trip, one object per line with exactly the protocol's keys", () => {
    const entries = [entry("cmpl-1", "return a + b  # sum", "2026-11-22T10:05:00Z"), entry("cmpl-2", "x\ny\n", "2026-11-22T10:06:00.000Z")];
    const text = toJsonl(entries);
    assert.equal(text.split("\n").length, 3);
    assert.ok(text.endsWith("\n"));
    assert.deepEqual(Object.keys(JSON.parse(text.split("\n")[0])), [
      "completion_id",
      "choice_index",
      "repository",
      "file_path",
      "inserted_text",
      "current_text",
      "start_offset",
      "state",
      "updated_at",
    ]);
    assert.deepEqual(parseJsonl(text), { entries, skipped: 0, lines: 2 });
  });

  test("the last line of a completion wins; bad lines are skipped and counted", () => {
    const text = [
      JSON.stringify(entry("cmpl-1", "first", "2026-11-22T10:00:00Z")),
      JSON.stringify(entry("cmpl-2", "other", "2026-11-22T10:00:00Z")),
      '{"completion_id": "cmpl-3", "torn',
      JSON.stringify({ completion_id: "cmpl-4" }),
      "",
      JSON.stringify(entry("cmpl-1", "", "2026-11-22T10:01:00Z", "removed")),
    ].join("\n");
    const parsed = parseJsonl(text);
    assert.equal(parsed.skipped, 2);
    assert.deepEqual(
      parsed.entries.map((e) => [e.completion_id, e.state, e.current_text]),
      [
        ["cmpl-2", "active", "other"],
        ["cmpl-1", "removed", ""],
      ],
    );
  });

  test("an entry without current_text (nothing edited yet) takes inserted_text, extra keys are dropped", () => {
    const line = JSON.stringify({ ...entry("c", "x", "2026-11-22T10:00:00Z"), current_text: undefined, extra: 1 });
    const [parsed] = parseJsonl(line).entries;
    assert.equal(parsed.current_text, "return a + b");
    assert.equal("extra" in parsed, false);
  });
});

describe("locating an accepted completion", () => {
  test("the text just inserted before the cursor", () => {
    const doc = "def f():\n    return 1\n";
    assert.deepEqual(locateInserted(doc, 21, ["return 1"], 0), { start: 13, text: "return 1" });
  });

  test("the full completion when the user typed along part of it", () => {
    const doc = "x = foo(bar)\n";
    assert.deepEqual(locateInserted(doc, 12, ["foo(bar)", "(bar)"], 4), { start: 4, text: "foo(bar)" });
  });

  test("a document with CRLF line endings", () => {
    const doc = "a\r\nif x:\r\n    y()\r\nz";
    assert.deepEqual(locateInserted(doc, 17, ["if x:\n    y()"], 3), { start: 3, text: "if x:\r\n    y()" });
  });

  test("elsewhere: the occurrence nearest the hint", () => {
    const doc = "ab ab ab ab";
    assert.equal(findNearest(doc, "ab", 7), 6);
    assert.deepEqual(locateInserted(doc, -1, ["ab"], 8), { start: 9, text: "ab" });
    assert.equal(locateInserted(doc, -1, ["zz"], 0), undefined);
  });
});
