// IDE events, batched: each event gets its id once, so a retried batch is stored once.

import { randomUUID } from "node:crypto";

export type EventType = "shown" | "accepted" | "partially_accepted" | "rejected" | "edited";

export interface KaizenEvent {
  id: string;
  completion_id: string;
  choice_index: number;
  type: EventType;
  timestamp: string;
  accepted_length?: number;
  text?: string;
}

export type Send = (events: KaizenEvent[]) => Promise<void>;

export interface BatcherOptions {
  maxBatch?: number;
  maxQueue?: number;
  now?: () => Date;
}

/** Queues events and sends them in batches; a failed send keeps them for the next flush. */
export class EventBatcher {
  private queue: KaizenEvent[] = [];
  private sending = false;
  dropped = 0;
  private readonly maxBatch: number;
  private readonly maxQueue: number;
  private readonly now: () => Date;

  constructor(private readonly send: Send, options: BatcherOptions = {}) {
    this.maxBatch = options.maxBatch ?? 50;
    this.maxQueue = options.maxQueue ?? 5000;
    this.now = options.now ?? (() => new Date());
  }

  add(completionId: string, type: EventType, extra: { accepted_length?: number; text?: string } = {}): KaizenEvent {
    const event: KaizenEvent = {
      id: randomUUID(),
      completion_id: completionId,
      choice_index: 0,
      type,
      timestamp: this.now().toISOString(),
      ...extra,
    };
    this.queue.push(event);
    if (this.queue.length > this.maxQueue) {
      // The server is gone for long: keep the newest events, count the rest.
      this.dropped += this.queue.length - this.maxQueue;
      this.queue = this.queue.slice(this.queue.length - this.maxQueue);
    }
    return event;
  }

  get pending(): number {
    return this.queue.length;
  }

  /** Sends everything queued, batch by batch; stops at the first failure and keeps the rest. */
  async flush(): Promise<boolean> {
    if (this.sending) {
      return false;
    }
    this.sending = true;
    try {
      while (this.queue.length) {
        const batch = this.queue.slice(0, this.maxBatch);
        try {
          await this.send(batch);
        } catch {
          return false;
        }
        this.queue = this.queue.slice(batch.length);
      }
      return true;
    } finally {
      this.sending = false;
    }
  }
}
