import assert from "node:assert/strict";
import { test } from "node:test";
import { EventBatcher, KaizenEvent } from "../src/events";

const now = () => new Date("2026-11-22T10:00:00Z");

test("events go out in batches with unique ids", async () => {
  const sent: KaizenEvent[][] = [];
  const batcher = new EventBatcher(async (batch) => void sent.push(batch), { maxBatch: 2, now });
  batcher.add("cmpl-1", "shown");
  batcher.add("cmpl-1", "accepted");
  batcher.add("cmpl-1", "partially_accepted", { accepted_length: 3 });
  assert.equal(await batcher.flush(), true);
  assert.deepEqual(sent.map((b) => b.length), [2, 1]);
  const ids = sent.flat().map((e) => e.id);
  assert.equal(new Set(ids).size, 3);
  assert.equal(sent[0][0].timestamp, "2026-11-22T10:00:00.000Z");
  assert.equal(sent[1][0].accepted_length, 3);
  assert.equal(batcher.pending, 0);
});

test("a failed send keeps the events, and the retry carries the same ids", async () => {
  let fail = true;
  const sent: KaizenEvent[][] = [];
  const batcher = new EventBatcher(async (batch) => {
    if (fail) throw new Error("server down");
    sent.push(batch);
  }, { now });
  const event = batcher.add("cmpl-1", "shown");
  assert.equal(await batcher.flush(), false);
  assert.equal(batcher.pending, 1);
  fail = false;
  assert.equal(await batcher.flush(), true);
  assert.equal(sent[0][0].id, event.id);
});

test("the queue is bounded and counts what it drops", () => {
  const batcher = new EventBatcher(async () => undefined, { maxQueue: 3, now });
  for (let i = 0; i < 5; i++) batcher.add(`cmpl-${i}`, "shown");
  assert.equal(batcher.pending, 3);
  assert.equal(batcher.dropped, 2);
});
