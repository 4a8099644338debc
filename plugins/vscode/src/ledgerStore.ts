// Where a repository's ledger lives: `.kaizen/ledger.jsonl` at the repository root (appended to,
// compacted now and then; the last line of an entry wins) and the server (`PUT /v1/ledger`, in
// batches, retried with back-off like events). No VS Code API here.

import { randomBytes } from "node:crypto";
import { promises as fsp } from "node:fs";
import * as path from "node:path";
import { errorKind } from "./client";
import { MAX_TEXT } from "./events";
import { exportEntry, Ledger, LEDGER_PATH, LedgerEntry, parseJsonl, Snapshot, toJsonl } from "./ledger";
import { Flusher, systemTimers, Timers } from "./retry";

const DAY_MS = 24 * 60 * 60 * 1000;

/** The ledger file: read whole, appended to, rewritten whole when it has grown. */
export class LedgerFile {
  /** Non-blank lines in the file, as far as this process knows. */
  lines = 0;

  constructor(readonly filePath: string) {}

  static at(root: string): LedgerFile {
    return new LedgerFile(path.join(root, ...LEDGER_PATH.split("/")));
  }

  async read(): Promise<{ entries: LedgerEntry[]; skipped: number }> {
    let text: string;
    try {
      text = await fsp.readFile(this.filePath, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") {
        this.lines = 0;
        return { entries: [], skipped: 0 };
      }
      throw err;
    }
    const parsed = parseJsonl(text);
    this.lines = parsed.lines;
    return { entries: parsed.entries, skipped: parsed.skipped };
  }

  async append(entries: LedgerEntry[]): Promise<void> {
    if (!entries.length) {
      return;
    }
    await this.ensureDirectory();
    // A line torn by a crash must not swallow the next one.
    const lead = (await this.endsMidLine()) ? "\n" : "";
    await fsp.appendFile(this.filePath, lead + toJsonl(entries), "utf8");
    this.lines += entries.length;
  }

  /** Replace the file with `entries` (write a temporary file, then rename it into place). */
  async rewrite(entries: LedgerEntry[]): Promise<void> {
    await this.ensureDirectory();
    const temporary = `${this.filePath}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
    try {
      await fsp.writeFile(temporary, toJsonl(entries), "utf8");
      await fsp.rename(temporary, this.filePath);
    } catch (err) {
      await fsp.rm(temporary, { force: true }).catch(() => undefined);
      throw err;
    }
    this.lines = entries.length;
  }

  private async endsMidLine(): Promise<boolean> {
    let handle;
    try {
      handle = await fsp.open(this.filePath, "r");
    } catch {
      return false;
    }
    try {
      const { size } = await handle.stat();
      if (size === 0) {
        return false;
      }
      const last = Buffer.alloc(1);
      await handle.read(last, 0, 1, size - 1);
      return last[0] !== 0x0a;
    } finally {
      await handle.close();
    }
  }

  /** Creates `.kaizen/` with a `.gitignore` of `*`, so the ledger is never committed. */
  private async ensureDirectory(): Promise<void> {
    const directory = path.dirname(this.filePath);
    const created = await fsp.mkdir(directory, { recursive: true });
    if (created !== undefined) {
      await fsp.writeFile(path.join(directory, ".gitignore"), "# Kaizen's ledger of accepted completions: local, never committed.\n*\n", { flag: "wx" }).catch(() => undefined);
    }
  }
}

export type PutEntries = (entries: LedgerEntry[]) => Promise<{ unknownCompletionIds?: string[] }>;

export interface RepositoryLedgerOptions {
  /** The repository root (the ledger file is `<root>/.kaizen/ledger.jsonl`). */
  root: string;
  repository: string;
  put: PutEntries;
  timers?: Timers;
  /** Write the file this long after a change, ms. */
  saveDelayMs?: number;
  /** Push this long after a change, ms. */
  pushIntervalMs?: number;
  /** Entries per `PUT /v1/ledger`. */
  maxBatch?: number;
  /** Entries untouched for this long are dropped when the file is compacted. */
  retentionDays?: number;
  /** Entries older than this are not pushed again on start-up (the server's default window). */
  repushDays?: number;
  /** Compact when the file has more than this many lines and twice the entries. */
  compactMinLines?: number;
  unknownAttempts?: number;
  unknownDelayMs?: number;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  onWarning?: (message: string) => void;
}

/** One repository's ledger: the model, its file, and its pushes to the server. */
export class RepositoryLedger {
  readonly ledger: Ledger;
  readonly file: LedgerFile;
  readonly root: string;
  readonly repository: string;
  private readonly timers: Timers;
  private readonly flusher: Flusher;
  private readonly options: RepositoryLedgerOptions;
  private saveTimer: unknown;
  private saving: Promise<void> = Promise.resolve();
  private limit: number;
  private readonly maxBatch: number;
  private readonly held = new Map<string, { notBefore: number; tries: number }>();
  private readonly warn: (message: string) => void;
  /** Entries given up on: refused by the server, too large, or of completions it never knew. */
  discarded = 0;

  constructor(options: RepositoryLedgerOptions) {
    this.options = options;
    this.root = options.root;
    this.repository = options.repository;
    this.timers = options.timers ?? systemTimers;
    this.ledger = new Ledger(() => this.timers.now());
    this.file = LedgerFile.at(options.root);
    this.maxBatch = Math.max(1, Math.min(1000, options.maxBatch ?? 200));
    this.limit = this.maxBatch;
    this.warn = options.onWarning ?? (() => undefined);
    this.flusher = new Flusher(() => this.pushOnce(), this.timers, {
      initialMs: options.initialBackoffMs,
      maxMs: options.maxBackoffMs,
    });
  }

  /** Read the ledger file. Recent entries are pushed again (the server keeps the newer one). */
  async load(): Promise<void> {
    const { entries, skipped } = await this.file.read();
    if (skipped) {
      this.warn(`Kaizen: skipped ${skipped} malformed line(s) in ${this.file.filePath}`);
    }
    const now = this.timers.now();
    const retention = now - (this.options.retentionDays ?? 90) * DAY_MS;
    const repush = now - (this.options.repushDays ?? 30) * DAY_MS;
    const kept = entries.filter((e) => Date.parse(e.updated_at) >= retention);
    this.ledger.load(kept.filter((e) => Date.parse(e.updated_at) < repush), { pushed: true });
    this.ledger.load(kept.filter((e) => Date.parse(e.updated_at) >= repush), { pushed: false });
    if (this.ledger.pendingPush().length) {
      this.flusher.schedule(this.options.pushIntervalMs ?? 5_000);
    }
  }

  /** The ledger changed: write the file soon, push soon. */
  changed(): void {
    if (this.saveTimer === undefined) {
      this.saveTimer = this.timers.setTimeout(() => {
        this.saveTimer = undefined;
        void this.save().catch((err) => this.warn(`Kaizen: could not write ${this.file.filePath}: ${(err as Error).message}`));
      }, this.options.saveDelayMs ?? 500);
    }
    this.flusher.schedule(this.options.pushIntervalMs ?? 5_000);
  }

  /** Append what changed to the file (compacting it when it has grown); one write at a time. */
  save(): Promise<void> {
    const run = this.saving.then(() => this.saveNow());
    this.saving = run.catch(() => undefined);
    return run;
  }

  private async saveNow(): Promise<void> {
    const pending = this.ledger.pendingSave();
    if (!pending.length) {
      return;
    }
    const entries = this.ledger.size;
    const minLines = this.options.compactMinLines ?? 200;
    if (this.file.lines + pending.length > Math.max(minLines, 2 * entries)) {
      await this.compact();
    } else {
      await this.file.append(pending.map((s) => s.entry));
    }
    this.ledger.markSaved(pending);
  }

  /** Rewrite the file with one line per entry: the file's entries merged with ours (another
   *  window may have appended), the newer of each pair kept, the long-untouched dropped. */
  private async compact(): Promise<void> {
    const { entries } = await this.file.read().catch(() => ({ entries: [] as LedgerEntry[] }));
    this.ledger.load(entries, { pushed: true });
    this.ledger.prune(this.timers.now() - (this.options.retentionDays ?? 90) * DAY_MS);
    await this.file.rewrite(this.ledger.entries());
  }

  /** Push what is ready now, ignoring the back-off. */
  push(): Promise<boolean> {
    return this.flusher.flush();
  }

  get pushFailures(): number {
    return this.flusher.failures;
  }

  /** Write and push everything now (deactivation). */
  async flush(): Promise<void> {
    if (this.saveTimer !== undefined) {
      this.timers.clearTimeout(this.saveTimer);
      this.saveTimer = undefined;
    }
    await this.save().catch((err) => this.warn(`Kaizen: could not write ${this.file.filePath}: ${(err as Error).message}`));
    await this.push();
  }

  dispose(): void {
    if (this.saveTimer !== undefined) {
      this.timers.clearTimeout(this.saveTimer);
      this.saveTimer = undefined;
    }
    this.flusher.dispose();
  }

  private async pushOnce(): Promise<{ more: boolean; nextAt?: number }> {
    const now = this.timers.now();
    const ready: Snapshot[] = [];
    for (const s of this.ledger.pendingPush()) {
      if ((this.held.get(s.key)?.notBefore ?? 0) > now) {
        continue;
      }
      if (s.entry.inserted_text.length > MAX_TEXT || s.entry.current_text.length > MAX_TEXT) {
        this.ledger.markPushed([s]); // the server would refuse it; the file keeps it
        this.discarded += 1;
        continue;
      }
      ready.push(s);
    }
    const batch = ready.slice(0, this.limit);
    if (!batch.length) {
      return this.status();
    }
    let unknown: Set<string>;
    try {
      const answer = await this.options.put(batch.map((s) => exportEntry(s.entry)));
      unknown = new Set(answer?.unknownCompletionIds ?? []);
      this.limit = Math.min(this.maxBatch, this.limit * 2);
    } catch (err) {
      const kind = errorKind(err);
      if (kind === "unknown_completion") {
        unknown = new Set(batch.map((s) => s.entry.completion_id));
      } else if (kind === "rejected") {
        if (batch.length > 1) {
          this.limit = Math.ceil(batch.length / 2);
          return { more: true };
        }
        this.ledger.markPushed(batch);
        this.discarded += 1;
        this.warn(`Kaizen: the server refused a ledger entry (${(err as Error).message}); not pushing it`);
        return this.status();
      } else {
        throw err;
      }
    }
    const attempts = this.options.unknownAttempts ?? 3;
    for (const s of batch) {
      if (unknown.has(s.entry.completion_id)) {
        const tries = (this.held.get(s.key)?.tries ?? 0) + 1;
        if (tries < attempts) {
          this.held.set(s.key, { notBefore: now + (this.options.unknownDelayMs ?? 30_000), tries });
          continue;
        }
        this.discarded += 1;
      }
      this.held.delete(s.key);
      this.ledger.markPushed([s]);
    }
    // Go on at once only with a backlog; what changed meanwhile waits for its scheduled push.
    return { more: ready.length > batch.length, nextAt: this.status().nextAt };
  }

  private status(): { more: boolean; nextAt?: number } {
    const now = this.timers.now();
    let more = false;
    let nextAt: number | undefined;
    for (const s of this.ledger.pendingPush()) {
      const notBefore = this.held.get(s.key)?.notBefore ?? 0;
      if (notBefore <= now) {
        more = true;
      } else if (nextAt === undefined || notBefore < nextAt) {
        nextAt = notBefore;
      }
    }
    return { more, nextAt };
  }
}
