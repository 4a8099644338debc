import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { KaizenError } from "../client";
import { EditReporter, EventBatcher, KaizenEvent, MAX_TEXT, SendEvents } from "../events";
import { FakeTimers, T0 } from "./helpers";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

function recorder(behaviour?: (batch: KaizenEvent[], call: number) => Promise<{ unknownCompletionIds?: string[] }> | { unknownCompletionIds?: string[] } | void) {
  const batches: KaizenEvent[][] = [];
  let calls = 0;
  const send: SendEvents = async (batch) => {
    calls += 1;
    batches.push(batch.map((e) => ({ ...e })));
    return (await behaviour?.(batch, calls)) ?? {};
  };
  return { send, batches, calls: () => calls };
}

describe("EventBatcher", () => {
  test("events carry the protocol's fields, a fresh UUID and an ISO timestamp", async () => {
    const timers = new FakeTimers();
    const { send, batches } = recorder();
    const batcher = new EventBatcher(send, { timers });
    batcher.add({ completion_id: "cmpl-1", type: "shown" });
    batcher.add({ completion_id: "cmpl-1", type: "partially_accepted", accepted_length: 7 });
    batcher.add({ completion_id: "cmpl-1", choice_index: 2, type: "edited", text: "return a - b" });
    await batcher.flush();
    const [shown, partial, edited] = batches[0];
    assert.deepEqual(Object.keys(shown), ["id", "completion_id", "choice_index", "type", "timestamp", "accepted_length", "text"]);
    assert.match(shown.id, UUID);
    assert.equal(shown.timestamp, new Date(T0).toISOString());
    assert.deepEqual({ ...shown, id: "" }, { id: "", completion_id: "cmpl-1", choice_index: 0, type: "shown", timestamp: "2026-11-22T10:00:00.000Z", accepted_length: null, text: null });
    assert.equal(partial.accepted_length, 7);
    assert.equal(partial.text, null);
    assert.equal(edited.text, "return a - b");
    assert.equal(edited.choice_index, 2);
  });

  test("ids are unique", () => {
    const batcher = new EventBatcher(async () => ({}), { timers: new FakeTimers(), maxQueue: 5000 });
    const ids = new Set<string>();
    for (let i = 0; i < 2000; i++) {
      ids.add(batcher.add({ completion_id: `cmpl-${i}`, type: "shown" }).id);
    }
    assert.equal(ids.size, 2000);
  });

  test("a flush comes interval after the first event, not before", async () => {
    const timers = new FakeTimers();
    const { send, batches } = recorder();
    const batcher = new EventBatcher(send, { timers, intervalMs: 5_000 });
    batcher.add({ completion_id: "cmpl-1", type: "shown" });
    await timers.advance(2_000);
    batcher.add({ completion_id: "cmpl-1", type: "rejected" });
    await timers.advance(2_999);
    assert.equal(batches.length, 0);
    await timers.advance(1);
    assert.deepEqual(batches.map((b) => b.map((e) => e.type)), [["shown", "rejected"]]);
    assert.equal(batcher.pending, 0);
  });

  test("reaching the batch size flushes at once, in batches of at most that size", async () => {
    const timers = new FakeTimers();
    const { send, batches } = recorder();
    const batcher = new EventBatcher(send, { timers, maxBatch: 3, intervalMs: 60_000 });
    for (let i = 0; i < 2; i++) batcher.add({ completion_id: `cmpl-${i}`, type: "shown" });
    await timers.advance(0);
    assert.equal(batches.length, 0);
    batcher.add({ completion_id: "cmpl-2", type: "shown" });
    await timers.advance(0);
    assert.deepEqual(batches.map((b) => b.length), [3]);
    for (let i = 0; i < 7; i++) batcher.add({ completion_id: `cmpl-x${i}`, type: "shown" });
    await batcher.flush();
    assert.deepEqual(batches.map((b) => b.length), [3, 3, 3, 1]);
  });

  test("a failed send keeps the events; retries back off and carry the same ids and timestamps", async () => {
    const timers = new FakeTimers();
    let down = true;
    const { send, batches, calls } = recorder(() => {
      if (down) throw new KaizenError("cannot reach the Kaizen server", { kind: "transient" });
    });
    const batcher = new EventBatcher(send, { timers, intervalMs: 1_000, initialBackoffMs: 1_000, maxBackoffMs: 8_000 });
    const first = batcher.add({ completion_id: "cmpl-1", type: "shown" });
    await timers.advance(1_000); // interval: fails
    assert.equal(calls(), 1);
    assert.equal(batcher.pending, 1);
    await timers.advance(999);
    assert.equal(calls(), 1, "backing off 1 s");
    await timers.advance(1); // fails again
    assert.equal(calls(), 2);
    await timers.advance(1_999);
    assert.equal(calls(), 2, "backing off 2 s");
    batcher.add({ completion_id: "cmpl-1", type: "accepted" });
    await timers.advance(1); // 3rd failure; the new event waits with the others
    assert.equal(calls(), 3);
    assert.equal(batcher.failures, 3);
    down = false;
    await timers.advance(4_000);
    assert.equal(calls(), 4);
    assert.equal(batcher.pending, 0);
    const ids = batches.map((b) => b.map((e) => e.id));
    assert.deepEqual(ids[0], [first.id]);
    assert.deepEqual(ids[1], [first.id]);
    assert.equal(ids[3][0], first.id, "the same id on every retry");
    assert.equal(new Set(batches.map((b) => b[0].timestamp)).size, 1, "the same timestamp on every retry");
    assert.deepEqual(batches[3].map((e) => e.type), ["shown", "accepted"]);
    assert.equal(batcher.failures, 0);
  });

  test("back-off is capped and honours Retry-After", async () => {
    const timers = new FakeTimers();
    const { send, calls } = recorder(() => {
      throw new KaizenError("loading", { status: 503, retryAfterMs: 10_000 });
    });
    const batcher = new EventBatcher(send, { timers, intervalMs: 0, initialBackoffMs: 1_000, maxBackoffMs: 4_000 });
    batcher.add({ completion_id: "cmpl-1", type: "shown" });
    await timers.advance(0);
    assert.equal(calls(), 1);
    await timers.advance(9_999);
    assert.equal(calls(), 1, "Retry-After: 10 s beats the 1 s back-off");
    await timers.advance(1);
    assert.equal(calls(), 2);
  });

  test("auth failures keep the events too", async () => {
    const timers = new FakeTimers();
    let ok = false;
    const { send } = recorder(() => {
      if (!ok) throw new KaizenError("no API token set", { kind: "auth" });
    });
    const batcher = new EventBatcher(send, { timers });
    batcher.add({ completion_id: "cmpl-1", type: "shown" });
    assert.equal(await batcher.flush(), false);
    assert.equal(batcher.pending, 1);
    ok = true;
    assert.equal(await batcher.flush(), true);
    assert.equal(batcher.pending, 0);
  });

  test("a batch the server refuses is halved until the bad event is alone, which is dropped", async () => {
    const timers = new FakeTimers();
    const warnings: string[] = [];
    const { send, batches } = recorder((batch) => {
      if (batch.some((e) => e.completion_id === "cmpl-bad")) {
        throw new KaizenError("Invalid request", { status: 400 });
      }
    });
    const batcher = new EventBatcher(send, { timers, maxBatch: 8, onWarning: (w) => warnings.push(w) });
    for (let i = 0; i < 8; i++) batcher.add({ completion_id: i === 5 ? "cmpl-bad" : `cmpl-${i}`, type: "shown" });
    await batcher.flush();
    assert.equal(batcher.pending, 0);
    assert.equal(batcher.discarded, 1);
    const delivered = batches.filter((b) => !b.some((e) => e.completion_id === "cmpl-bad")).flat();
    assert.deepEqual(delivered.map((e) => e.completion_id).sort(), ["cmpl-0", "cmpl-1", "cmpl-2", "cmpl-3", "cmpl-4", "cmpl-6", "cmpl-7"]);
    assert.equal(warnings.length, 1);
  });

  test("events of completions the server does not know yet are retried a few times, then dropped", async () => {
    const timers = new FakeTimers();
    const { send, batches } = recorder(() => ({ unknownCompletionIds: ["cmpl-late"] }));
    const batcher = new EventBatcher(send, { timers, unknownAttempts: 3, unknownDelayMs: 30_000 });
    batcher.add({ completion_id: "cmpl-late", type: "shown" });
    batcher.add({ completion_id: "cmpl-known", type: "shown" });
    await batcher.flush();
    assert.deepEqual(batcher.queued().map((e) => e.completion_id), ["cmpl-late"]);
    await timers.advance(29_999);
    assert.equal(batches.length, 1);
    await timers.advance(1);
    assert.equal(batches.length, 2);
    await timers.advance(30_000);
    assert.equal(batches.length, 3);
    assert.equal(batcher.pending, 0, "dropped after 3 tries");
    assert.equal(batcher.discarded, 1);
    assert.equal(new Set(batches.map((b) => b.find((e) => e.completion_id === "cmpl-late")!.id)).size, 1);
  });

  test("a 404 naming only unknown completions counts as unknown for the whole batch", async () => {
    const timers = new FakeTimers();
    let known = false;
    const { send } = recorder(() => {
      if (!known) throw new KaizenError("No event names a completion this server knows", { status: 404, code: "unknown_completion" });
    });
    const batcher = new EventBatcher(send, { timers, unknownDelayMs: 1_000 });
    batcher.add({ completion_id: "cmpl-1", type: "shown" });
    await batcher.flush();
    assert.equal(batcher.pending, 1);
    known = true; // the server's recorder caught up
    await timers.advance(1_000);
    assert.equal(batcher.pending, 0);
    assert.equal(batcher.discarded, 0);
  });

  test("the queue is bounded: the oldest go, counted, with a warning", () => {
    const warnings: string[] = [];
    const batcher = new EventBatcher(async () => ({}), { timers: new FakeTimers(), maxQueue: 3, onWarning: (w) => warnings.push(w) });
    for (let i = 0; i < 5; i++) batcher.add({ completion_id: `cmpl-${i}`, type: "shown" });
    assert.equal(batcher.pending, 3);
    assert.equal(batcher.dropped, 2);
    assert.deepEqual(batcher.queued().map((e) => e.completion_id), ["cmpl-2", "cmpl-3", "cmpl-4"]);
    assert.equal(warnings.length, 1);
  });

  test("an edited text longer than the server takes is cut to its limit", () => {
    const batcher = new EventBatcher(async () => ({}), { timers: new FakeTimers() });
    assert.equal(batcher.add({ completion_id: "c", type: "edited", text: "x".repeat(MAX_TEXT + 5) }).text!.length, MAX_TEXT);
  });
});

describe("EditReporter", () => {
  test("one edited event per pause, with the latest text, none when back to what was reported", async () => {
    const timers = new FakeTimers();
    const emitted: [string, number, string][] = [];
    const edits = new EditReporter((id, index, text) => emitted.push([id, index, text]), { timers, quietMs: 2_000 });
    edits.baseline("cmpl-1", 0, "return a + b");
    edits.changed("cmpl-1", 0, "return a + b ");
    await timers.advance(1_000);
    edits.changed("cmpl-1", 0, "return a + b  # sum");
    await timers.advance(1_999);
    assert.deepEqual(emitted, []);
    await timers.advance(1);
    assert.deepEqual(emitted, [["cmpl-1", 0, "return a + b  # sum"]]);
    edits.changed("cmpl-1", 0, "return a + b  # sum"); // no change since the last report
    await timers.advance(2_000);
    assert.equal(emitted.length, 1);
    edits.changed("cmpl-2", 1, "");
    edits.flushAll();
    assert.deepEqual(emitted[1], ["cmpl-2", 1, ""]);
  });
});
