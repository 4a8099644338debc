import assert from "node:assert/strict";
import { appendFileSync, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { after, describe, test } from "node:test";
import { KaizenError } from "../client";
import { LedgerEntry, parseJsonl } from "../ledger";
import { PutEntries, RepositoryLedger } from "../ledgerStore";
import { FakeTimers } from "./helpers";

const base = mkdtempSync(path.join(tmpdir(), "kaizen-ledger-"));
const stores: RepositoryLedger[] = [];
// A save a test started without awaiting may still be writing here when the suite ends
// (ENOTEMPTY seen on a loaded machine, even with removal retries): wait for every store's
// writes to settle first, then remove, still retrying for writes of stores made elsewhere.
after(async () => {
  await Promise.allSettled(stores.map((s) => s.save()));
  rmSync(base, { recursive: true, force: true, maxRetries: 10, retryDelay: 50 });
});
let counter = 0;

function setup(put: PutEntries = async () => ({}), options: Partial<ConstructorParameters<typeof RepositoryLedger>[0]> = {}) {
  const root = path.join(base, `repo-${++counter}`);
  const timers = new FakeTimers();
  const store = new RepositoryLedger({ root, repository: "github.com/acme/app", put, timers, saveDelayMs: 100, pushIntervalMs: 1_000, ...options });
  stores.push(store);
  const accept = (id: string, text = "return a + b", offset = 0) =>
    store.ledger.accept({ completion_id: id, repository: "github.com/acme/app", file_path: "src/util.py", text, start_offset: offset });
  const file = path.join(root, ".kaizen", "ledger.jsonl");
  return { root, timers, store, accept, file, read: () => parseJsonl(readFileSync(file, "utf8")) };
}

describe("the ledger file", () => {
  test("a change is appended soon after; .kaizen/ gets a .gitignore", async () => {
    const { store, accept, timers, file, root, read } = setup();
    accept("cmpl-1");
    store.changed();
    await timers.advance(99);
    assert.equal(existsSync(file), false);
    await timers.advance(1);
    await store.save(); // wait for the write
    assert.deepEqual(read().entries.map((e) => e.completion_id), ["cmpl-1"]);
    assert.equal(readFileSync(path.join(root, ".kaizen", ".gitignore"), "utf8").split("\n").includes("*"), true);
    store.ledger.applyChanges("src/util.py", [{ offset: 11, length: 1, text: "c" }]);
    store.changed();
    await store.flush();
    const { entries, lines } = read();
    assert.equal(lines, 2, "appended, not rewritten");
    assert.equal(entries[0].current_text, "return a + c", "the last line wins");
    store.dispose();
  });

  test("loading reads it back; a torn last line does not swallow the next entry", async () => {
    const first = setup();
    first.accept("cmpl-1");
    first.accept("cmpl-2", "x = 1", 40);
    await first.store.save();
    appendFileSync(first.file, '{"completion_id": "cmpl-torn", "repo');
    first.accept("cmpl-3", "y = 2", 60);
    await first.store.save();
    const again = new RepositoryLedger({ root: first.root, repository: "github.com/acme/app", put: async () => ({}), timers: first.timers });
    await again.load();
    assert.deepEqual(again.ledger.entries().map((e) => e.completion_id).sort(), ["cmpl-1", "cmpl-2", "cmpl-3"]);
    first.store.dispose();
    again.dispose();
  });

  test("it is compacted to one line per entry once it has grown, keeping other windows' newer lines", async () => {
    const { store, accept, read, file } = setup(async () => ({}), { compactMinLines: 10 });
    accept("cmpl-1");
    await store.save();
    // Another window appended a newer version of an entry we do not hold.
    const foreign: LedgerEntry = { ...store.ledger.get("cmpl-1")!, completion_id: "cmpl-9", file_path: "src/other.py", updated_at: "2030-01-01T00:00:00Z" };
    appendFileSync(file, JSON.stringify(foreign) + "\n");
    for (let i = 0; i < 12; i++) {
      store.ledger.applyChanges("src/util.py", [{ offset: 7, length: 0, text: "x" }]);
      await store.save();
    }
    const { entries, lines } = read();
    assert.ok(lines <= 4, `compacted: ${lines} lines for 13 versions of one entry and another window's`);
    assert.deepEqual(entries.map((e) => e.completion_id).sort(), ["cmpl-1", "cmpl-9"]);
    assert.equal(entries.find((e) => e.completion_id === "cmpl-1")!.current_text, "return " + "x".repeat(12) + "a + b");
    store.dispose();
  });

  test("entries untouched for longer than the retention are dropped at compaction and not pushed again", async () => {
    const old = setup();
    old.accept("cmpl-old");
    await old.store.save();
    const puts: LedgerEntry[][] = [];
    const later = new RepositoryLedger({
      root: old.root,
      repository: "r",
      put: async (e) => (puts.push(e), {}),
      timers: old.timers,
      retentionDays: 90,
      repushDays: 30,
    });
    old.timers.time += 40 * 24 * 3600 * 1000;
    await later.load();
    assert.equal(later.ledger.size, 1, "40 days: kept");
    await later.push();
    assert.equal(puts.length, 0, "older than 30 days: not pushed again");
    later.dispose();
    const muchLater = new RepositoryLedger({ root: old.root, repository: "r", put: async () => ({}), timers: old.timers });
    old.timers.time += 60 * 24 * 3600 * 1000;
    await muchLater.load();
    assert.equal(muchLater.ledger.size, 0, "100 days: gone");
    old.store.dispose();
    muchLater.dispose();
  });
});

describe("pushing the ledger", () => {
  test("changes go to PUT /v1/ledger in batches, after the push interval", async () => {
    const batches: LedgerEntry[][] = [];
    const { store, accept, timers } = setup(async (entries) => (batches.push(entries), {}), { maxBatch: 2 });
    for (let i = 0; i < 5; i++) accept(`cmpl-${i}`);
    store.changed();
    await timers.advance(999);
    assert.equal(batches.length, 0);
    await timers.advance(1);
    assert.deepEqual(batches.map((b) => b.length), [2, 2, 1]);
    assert.deepEqual(Object.keys(batches[0][0]), ["completion_id", "choice_index", "repository", "file_path", "inserted_text", "current_text", "start_offset", "state", "updated_at"]);
    assert.equal(store.ledger.pendingPush().length, 0);
    store.dispose();
  });

  test("a failed push keeps the entries dirty and retries with back-off; the latest state goes", async () => {
    let down = true;
    const batches: LedgerEntry[][] = [];
    const { store, accept, timers } = setup(async (entries) => {
      batches.push(entries);
      if (down) throw new KaizenError("cannot reach the Kaizen server", { kind: "transient" });
      return {};
    }, { initialBackoffMs: 2_000 });
    accept("cmpl-1");
    store.changed();
    await timers.advance(1_000);
    assert.equal(batches.length, 1);
    assert.equal(store.ledger.pendingPush().length, 1);
    store.ledger.applyChanges("src/util.py", [{ offset: 0, length: 12, text: "" }]); // deleted meanwhile
    store.changed();
    await timers.advance(1_999);
    assert.equal(batches.length, 1, "backing off");
    down = false;
    await timers.advance(1);
    assert.equal(batches.length, 2);
    assert.equal(batches[1][0].state, "removed");
    assert.equal(store.ledger.pendingPush().length, 0);
    store.dispose();
  });

  test("entries of unknown completions are retried later, then given up; a refused entry is dropped", async () => {
    const batches: LedgerEntry[][] = [];
    const { store, accept, timers } = setup(async (entries) => {
      batches.push(entries);
      if (entries.some((e) => e.completion_id === "cmpl-bad")) throw new KaizenError("Invalid request", { status: 400 });
      return { unknownCompletionIds: ["cmpl-late"] };
    }, { unknownAttempts: 2, unknownDelayMs: 10_000 });
    accept("cmpl-ok");
    accept("cmpl-late");
    accept("cmpl-bad");
    await store.push();
    assert.deepEqual(store.ledger.pendingPush().map((s) => s.entry.completion_id), ["cmpl-late"]);
    assert.equal(store.discarded, 1);
    await timers.advance(10_000);
    assert.deepEqual(store.ledger.pendingPush(), [], "given up after 2 tries");
    assert.equal(store.discarded, 2);
    store.dispose();
  });
});
