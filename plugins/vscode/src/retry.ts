// Timers that tests can drive, and the flush loop shared by the event batcher and the ledger
// pusher: flush after an interval or at once, back off exponentially after a failure.
// No VS Code API here.

export interface Timers {
  now(): number;
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const systemTimers: Timers = {
  now: () => Date.now(),
  setTimeout: (callback, ms) => {
    const handle = setTimeout(callback, ms);
    // A pending flush must not keep a process (a test run, the extension host) alive.
    (handle as { unref?: () => void }).unref?.();
    return handle;
  },
  clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/** Resolves after `ms`, or early with false when `signal` aborts. */
export function sleep(timers: Timers, ms: number, signal?: AbortSignal): Promise<boolean> {
  if (signal?.aborted) {
    return Promise.resolve(false);
  }
  return new Promise((resolve) => {
    const onAbort = () => {
      timers.clearTimeout(handle);
      resolve(false);
    };
    const handle = timers.setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve(true);
    }, Math.max(0, ms));
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

export interface BackoffOptions {
  /** First delay after a failure, ms. */
  initialMs?: number;
  /** Longest delay, ms. */
  maxMs?: number;
}

export interface WorkResult {
  /** Something is ready to go right away: run again now. */
  more: boolean;
  /** When something held back becomes ready (ms since the epoch of `Timers.now`). */
  nextAt?: number;
}

/**
 * Runs `work` when scheduled, one run at a time. A run that throws is retried after a delay
 * that doubles with each consecutive failure (capped, and never shorter than a
 * `retryAfterMs` the error carries); a success resets it.
 */
export class Flusher {
  private timer: unknown;
  private timerAt = Number.POSITIVE_INFINITY;
  private running: Promise<boolean> | undefined;
  private backoffUntil = 0;
  private disposed = false;
  /** Consecutive failed runs. */
  failures = 0;
  lastError: unknown;
  private readonly initialMs: number;
  private readonly maxMs: number;

  constructor(
    private readonly work: () => Promise<WorkResult>,
    private readonly timers: Timers,
    backoff: BackoffOptions = {},
  ) {
    this.initialMs = backoff.initialMs ?? 1_000;
    this.maxMs = backoff.maxMs ?? 60_000;
  }

  /** The delay after the `failures`-th consecutive failure. */
  backoffDelay(failures: number): number {
    return Math.min(this.maxMs, this.initialMs * 2 ** Math.max(0, failures - 1));
  }

  /** Run in `delayMs` (or later, while backing off); an earlier scheduled run stands. */
  schedule(delayMs: number): void {
    if (this.disposed) {
      return;
    }
    const now = this.timers.now();
    const at = Math.max(now + Math.max(0, delayMs), this.backoffUntil);
    if (this.timer !== undefined && this.timerAt <= at) {
      return;
    }
    this.cancelTimer();
    this.timerAt = at;
    this.timer = this.timers.setTimeout(() => {
      this.timer = undefined;
      this.timerAt = Number.POSITIVE_INFINITY;
      if (this.running) {
        // Due while a run is going on: run again once it is over.
        void this.running.then(() => this.schedule(0));
      } else {
        void this.flush();
      }
    }, at - now);
  }

  /** Whether a run is scheduled or going on. */
  get busy(): boolean {
    return this.timer !== undefined || this.running !== undefined;
  }

  /** Run now, ignoring the back-off; resolves true when the run had nothing left to do. */
  flush(): Promise<boolean> {
    if (!this.running) {
      this.running = this.loop().finally(() => {
        this.running = undefined;
      });
    }
    return this.running;
  }

  private async loop(): Promise<boolean> {
    for (;;) {
      let result: WorkResult;
      try {
        result = await this.work();
      } catch (err) {
        this.failures += 1;
        this.lastError = err;
        const retryAfter = (err as { retryAfterMs?: unknown })?.retryAfterMs;
        const delay = Math.max(this.backoffDelay(this.failures), typeof retryAfter === "number" ? retryAfter : 0);
        this.backoffUntil = this.timers.now() + delay;
        this.schedule(delay);
        return false;
      }
      this.failures = 0;
      this.lastError = undefined;
      this.backoffUntil = 0;
      if (result.nextAt !== undefined) {
        this.schedule(result.nextAt - this.timers.now());
      }
      if (!result.more || this.disposed) {
        return true;
      }
    }
  }

  private cancelTimer(): void {
    if (this.timer !== undefined) {
      this.timers.clearTimeout(this.timer);
      this.timer = undefined;
      this.timerAt = Number.POSITIVE_INFINITY;
    }
  }

  dispose(): void {
    this.disposed = true;
    this.cancelTimer();
  }
}
