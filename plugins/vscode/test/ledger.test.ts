import assert from "node:assert/strict";
import { test } from "node:test";
import { Ledger } from "../src/ledger";

const now = () => new Date("2026-11-22T10:00:00Z");

function setup() {
  // "def add(a, b):\n    " + completion "return a - b" + "\n"
  let doc = "def add(a, b):\n    return a - b\n";
  const ledger = new Ledger(now);
  ledger.accept({ completion_id: "cmpl-1", repository: "r", file_path: "src/calc.py", inserted_text: "return a - b", start_offset: 19 });
  const edit = (offset: number, length: number, text: string) => {
    doc = doc.slice(0, offset) + text + doc.slice(offset + length);
    return ledger.applyChange("src/calc.py", { offset, length, text }, doc);
  };
  return { ledger, edit, doc: () => doc };
}

test("an edit before the region shifts it", () => {
  const { ledger, edit } = setup();
  assert.deepEqual(edit(0, 0, "# calc\n"), []);
  const [entry] = ledger.all();
  assert.equal(entry.start_offset, 26);
  assert.equal(entry.current_text, "return a - b");
});

test("an edit inside the region updates its current text (the fix)", () => {
  const { ledger, edit } = setup();
  const changed = edit(19 + "return a ".length, 1, "+");
  assert.equal(changed.length, 1);
  const [entry] = ledger.all();
  assert.equal(entry.current_text, "return a + b");
  assert.equal(entry.inserted_text, "return a - b");
  assert.equal(entry.state, "active");
});

test("an edit after the region leaves it alone", () => {
  const { ledger, edit, doc } = setup();
  assert.deepEqual(edit(doc().length, 0, "\nprint(add(1, 2))\n"), []);
  assert.equal(ledger.all()[0].start_offset, 19);
});

test("deleting the whole region marks it removed", () => {
  const { ledger, edit } = setup();
  edit(15, 17, "");
  const [entry] = ledger.all();
  assert.equal(entry.state, "removed");
  assert.equal(entry.current_text, "");
});

test("entries to push are the changed ones, until marked pushed", () => {
  const { ledger, edit } = setup();
  assert.equal(ledger.pendingPush().length, 1);
  ledger.markPushed(ledger.pendingPush());
  assert.equal(ledger.pendingPush().length, 0);
  edit(0, 0, "x");
  assert.equal(ledger.pendingPush().length, 1);
});

test("JSON Lines round trip; the last line wins; torn lines are skipped", () => {
  const { ledger } = setup();
  const line = ledger.serialise();
  const newer = JSON.stringify({ ...JSON.parse(line), current_text: "return a + b" });
  const parsed = Ledger.parse(line + newer + "\n{torn", now);
  assert.equal(parsed.all().length, 1);
  assert.equal(parsed.all()[0].current_text, "return a + b");
  assert.equal(Ledger.parse(ledger.serialise(), now).serialise(), ledger.serialise());
});
