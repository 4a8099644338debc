// IDE events (`POST /v1/events`, plugins/PROTOCOL.md), batched. Each event gets its id once, so
// a retried batch is stored once. No VS Code API here.

import { randomUUID } from "node:crypto";
import { errorKind } from "./client";
import { Flusher, systemTimers, Timers } from "./retry";

export type EventType = "shown" | "accepted" | "partially_accepted" | "rejected" | "edited";

/** Exactly the protocol's fields (the server refuses others). */
export interface KaizenEvent {
  id: string;
  completion_id: string;
  choice_index: number;
  type: EventType;
  timestamp: string;
  accepted_length: number | null;
  text: string | null;
}

export interface NewEvent {
  completion_id: string;
  choice_index?: number;
  type: EventType;
  /** `partially_accepted`: characters kept. */
  accepted_length?: number;
  /** `edited`: the region's current text. */
  text?: string;
}

/** Sends one batch; resolves with the completion ids the server did not know. */
export type SendEvents = (events: KaizenEvent[]) => Promise<{ unknownCompletionIds?: string[] }>;

/** The server's limits (server/api/feedback_protocol.py). */
export const MAX_BATCH = 1000;
export const MAX_TEXT = 200_000;

export interface BatcherOptions {
  /** Events per request; reaching it flushes at once. */
  maxBatch?: number;
  /** Flush this long after the first queued event, ms. */
  intervalMs?: number;
  /** Events kept while the server is away; past it the oldest go (and are counted). */
  maxQueue?: number;
  /** An event of a completion the server does not know (yet: records are written
   *  asynchronously) is tried this many times, `unknownDelayMs` apart, then dropped. */
  unknownAttempts?: number;
  unknownDelayMs?: number;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  timers?: Timers;
  newId?: () => string;
  /** Told once per loss: how many events were dropped and why. */
  onWarning?: (message: string) => void;
}

interface Queued {
  event: KaizenEvent;
  notBefore: number;
  unknownTries: number;
}

export class EventBatcher {
  private queue: Queued[] = [];
  private limit: number;
  private readonly flusher: Flusher;
  private readonly maxBatch: number;
  private readonly intervalMs: number;
  private readonly maxQueue: number;
  private readonly unknownAttempts: number;
  private readonly unknownDelayMs: number;
  private readonly timers: Timers;
  private readonly newId: () => string;
  private readonly warn: (message: string) => void;
  /** Dropped because the queue overflowed. */
  dropped = 0;
  /** Dropped because the server refused them (400) or never knew their completion. */
  discarded = 0;
  /** Requests that went out, successful or not. */
  requests = 0;

  constructor(
    private readonly send: SendEvents,
    options: BatcherOptions = {},
  ) {
    this.maxBatch = Math.max(1, Math.min(MAX_BATCH, options.maxBatch ?? 100));
    this.limit = this.maxBatch;
    this.intervalMs = options.intervalMs ?? 5_000;
    this.maxQueue = Math.max(1, options.maxQueue ?? 10_000);
    this.unknownAttempts = options.unknownAttempts ?? 3;
    this.unknownDelayMs = options.unknownDelayMs ?? 30_000;
    this.timers = options.timers ?? systemTimers;
    this.newId = options.newId ?? randomUUID;
    this.warn = options.onWarning ?? (() => undefined);
    this.flusher = new Flusher(() => this.sendOnce(), this.timers, {
      initialMs: options.initialBackoffMs,
      maxMs: options.maxBackoffMs,
    });
  }

  /** Queue an event: its id and timestamp are fixed now. */
  add(input: NewEvent): KaizenEvent {
    const text = input.text === undefined ? null : input.text.slice(0, MAX_TEXT);
    const event: KaizenEvent = {
      id: this.newId(),
      completion_id: input.completion_id,
      choice_index: input.choice_index ?? 0,
      type: input.type,
      timestamp: new Date(this.timers.now()).toISOString(),
      accepted_length: input.accepted_length === undefined ? null : Math.max(0, Math.floor(input.accepted_length)),
      text,
    };
    this.queue.push({ event, notBefore: 0, unknownTries: 0 });
    if (this.queue.length > this.maxQueue) {
      const excess = this.queue.length - this.maxQueue;
      const before = this.dropped;
      this.queue.splice(0, excess);
      this.dropped += excess;
      if (before === 0 || Math.floor(before / 1000) !== Math.floor(this.dropped / 1000)) {
        this.warn(`Kaizen: the server has been unreachable for long; dropped ${this.dropped} oldest event(s) so far`);
      }
    }
    this.flusher.schedule(this.readyCount() >= this.maxBatch ? 0 : this.intervalMs);
    return event;
  }

  /** Events waiting to go out (ready or held back). */
  get pending(): number {
    return this.queue.length;
  }

  /** The queued events, oldest first (for inspection). */
  queued(): KaizenEvent[] {
    return this.queue.map((q) => q.event);
  }

  get failures(): number {
    return this.flusher.failures;
  }

  /** Send what is ready now, ignoring the back-off; true when nothing ready is left. */
  flush(): Promise<boolean> {
    return this.flusher.flush();
  }

  dispose(): void {
    this.flusher.dispose();
  }

  private readyCount(): number {
    const now = this.timers.now();
    return this.queue.filter((q) => q.notBefore <= now).length;
  }

  private async sendOnce(): Promise<{ more: boolean; nextAt?: number }> {
    const now = this.timers.now();
    const ready = this.queue.filter((q) => q.notBefore <= now);
    const batch = ready.slice(0, this.limit);
    if (!batch.length) {
      return this.status();
    }
    this.requests += 1;
    let unknown: Set<string>;
    try {
      const answer = await this.send(batch.map((q) => q.event));
      unknown = new Set(answer?.unknownCompletionIds ?? []);
      this.limit = Math.min(this.maxBatch, this.limit * 2);
    } catch (err) {
      const kind = errorKind(err);
      if (kind === "unknown_completion") {
        unknown = new Set(batch.map((q) => q.event.completion_id));
      } else if (kind === "rejected") {
        if (batch.length > 1) {
          this.limit = Math.ceil(batch.length / 2); // find the bad event by halving
          return { more: true };
        }
        this.remove(batch);
        this.discarded += 1;
        this.warn(`Kaizen: the server refused an event (${(err as Error).message}); dropped it`);
        return this.status();
      } else {
        throw err; // transient, auth: keep everything, back off
      }
    }
    const done: Queued[] = [];
    for (const q of batch) {
      if (unknown.has(q.event.completion_id) && ++q.unknownTries < this.unknownAttempts) {
        q.notBefore = now + this.unknownDelayMs;
      } else {
        if (unknown.has(q.event.completion_id)) {
          this.discarded += 1;
        }
        done.push(q);
      }
    }
    this.remove(done);
    // Go on at once only with a backlog; what was added meanwhile waits for its scheduled flush.
    return { more: ready.length > batch.length, nextAt: this.status().nextAt };
  }

  private remove(items: Queued[]): void {
    const gone = new Set(items);
    this.queue = this.queue.filter((q) => !gone.has(q));
  }

  private status(): { more: boolean; nextAt?: number } {
    const now = this.timers.now();
    let nextAt: number | undefined;
    let ready = 0;
    for (const q of this.queue) {
      if (q.notBefore <= now) {
        ready += 1;
      } else if (nextAt === undefined || q.notBefore < nextAt) {
        nextAt = q.notBefore;
      }
    }
    return { more: ready > 0, nextAt };
  }
}

/**
 * `edited` events once the developer pauses: each change of a region restarts its timer; when
 * it fires, the region's latest text is reported if it differs from the last text reported
 * (at first, the text that was accepted).
 */
export class EditReporter {
  private readonly timers: Timers;
  private readonly pending = new Map<string, { handle: unknown; text: string; completionId: string; choiceIndex: number }>();
  private readonly reported = new Map<string, string>();

  constructor(
    private readonly emit: (completionId: string, choiceIndex: number, text: string) => void,
    options: { quietMs?: number; timers?: Timers } = {},
  ) {
    this.timers = options.timers ?? systemTimers;
    this.quietMs = options.quietMs ?? 2_000;
  }

  private readonly quietMs: number;

  /** The region's text as accepted: edits that come back to it report nothing. */
  baseline(completionId: string, choiceIndex: number, text: string): void {
    const key = `${completionId}#${choiceIndex}`;
    this.cancel(key);
    this.reported.set(key, text);
  }

  changed(completionId: string, choiceIndex: number, text: string): void {
    const key = `${completionId}#${choiceIndex}`;
    this.cancel(key);
    const handle = this.timers.setTimeout(() => this.fire(key), this.quietMs);
    this.pending.set(key, { handle, text, completionId, choiceIndex });
  }

  /** Report everything pending now (deactivation). */
  flushAll(): void {
    for (const key of [...this.pending.keys()]) {
      this.fire(key);
    }
  }

  dispose(): void {
    for (const key of [...this.pending.keys()]) {
      this.cancel(key);
    }
  }

  private fire(key: string): void {
    const item = this.pending.get(key);
    if (!item) {
      return;
    }
    this.cancel(key);
    if (this.reported.get(key) !== item.text) {
      this.reported.set(key, item.text);
      this.emit(item.completionId, item.choiceIndex, item.text);
    }
  }

  private cancel(key: string): void {
    const item = this.pending.get(key);
    if (item) {
      this.timers.clearTimeout(item.handle);
      this.pending.delete(key);
    }
  }
}
