// The ledger of accepted completions (plugins/PROTOCOL.md): where each one went and the region's
// current text, kept up to date as the developer edits around it. This module is the model:
// edits, JSON Lines, dirty tracking. Files and pushing are in ledgerStore.ts. No VS Code API here.

export const LEDGER_PATH = ".kaizen/ledger.jsonl";

export type LedgerState = "active" | "removed";

/** Exactly the protocol's fields (the server refuses others). */
export interface LedgerEntry {
  completion_id: string;
  choice_index: number;
  repository: string;
  /** Relative to the repository root, `/` separators. */
  file_path: string;
  inserted_text: string;
  current_text: string;
  /** UTF-16 offset of the region in the file (a hint: CI searches for the text). */
  start_offset: number;
  state: LedgerState;
  updated_at: string;
}

/** One edit of a document: `length` characters at `offset` replaced by `text`. */
export interface TextChange {
  offset: number;
  length: number;
  text: string;
}

export interface Region {
  start_offset: number;
  current_text: string;
}

/**
 * What an edit did to a region:
 * - `none`: it was after the region, or touched its end from outside (typing right after it);
 * - `shifted`: it was before the region (typing right before it too), which moved;
 * - `edited`: it was inside or overlapped the region, whose text changed;
 * - `relocated`: it replaced the whole region with text that still contains it;
 * - `removed`: it deleted the region (or replaced it with text that does not contain it).
 */
export type ChangeEffect = "none" | "shifted" | "edited" | "relocated" | "removed";

export interface ChangeOutcome extends Region {
  effect: ChangeEffect;
}

/** The region after `change`, computed from the region alone (not from the document). */
export function applyChange(region: Region, change: TextChange): ChangeOutcome {
  const s = region.start_offset;
  const cur = region.current_text;
  const e = s + cur.length;
  const a = change.offset;
  const b = change.offset + change.length;
  const t = change.text;
  const delta = t.length - change.length;
  const same = { start_offset: s, current_text: cur };

  if (change.length === 0) {
    if (!t) {
      return { ...same, effect: "none" };
    }
    if (a <= s) {
      return { start_offset: s + t.length, current_text: cur, effect: "shifted" };
    }
    if (a >= e) {
      return { ...same, effect: "none" };
    }
    return { start_offset: s, current_text: cur.slice(0, a - s) + t + cur.slice(a - s), effect: "edited" };
  }
  if (b <= s) {
    return delta === 0 ? { ...same, effect: "none" } : { start_offset: s + delta, current_text: cur, effect: "shifted" };
  }
  if (a >= e) {
    return { ...same, effect: "none" };
  }
  if (a <= s && b >= e) {
    const found = cur ? findNearest(t, cur, s - a) : -1;
    if (found !== -1) {
      return { start_offset: a + found, current_text: cur, effect: "relocated" };
    }
    return { start_offset: a, current_text: "", effect: "removed" };
  }
  return {
    start_offset: Math.min(s, a),
    current_text: cur.slice(0, Math.max(0, a - s)) + t + cur.slice(Math.min(cur.length, b - s)),
    effect: "edited",
  };
}

/** Offset of the occurrence of `needle` in `haystack` nearest to `near`, or -1. */
export function findNearest(haystack: string, needle: string, near: number): number {
  if (!needle) {
    return -1;
  }
  let best = -1;
  let position = haystack.indexOf(needle);
  for (let seen = 0; position !== -1 && seen < 10_000; seen++) {
    if (best === -1 || Math.abs(position - near) < Math.abs(best - near)) {
      best = position;
    } else if (position > near) {
      break; // further occurrences are only further away
    }
    position = haystack.indexOf(needle, position + 1);
  }
  return best;
}

/** The text with the other line-ending convention, for matching across `\n` / `\r\n`. */
function eolVariants(text: string): string[] {
  const lf = text.replace(/\r\n/g, "\n");
  const crlf = lf.replace(/\n/g, "\r\n");
  return [...new Set([text, lf, crlf])];
}

/**
 * Where an accepted completion landed: the editor has just inserted one of `candidates` (the
 * full completion, or what was left of it) ending at `cursor`; else the nearest occurrence to
 * `hint`. The text returned is as it is in the document (its line endings).
 */
export function locateInserted(
  documentText: string,
  cursor: number,
  candidates: string[],
  hint: number,
): { start: number; text: string } | undefined {
  const variants = candidates.filter((c) => c.length > 0).flatMap(eolVariants);
  for (const text of variants) {
    const start = cursor - text.length;
    if (start >= 0 && documentText.startsWith(text, start)) {
      return { start, text };
    }
  }
  for (const text of variants) {
    const start = findNearest(documentText, text, hint);
    if (start !== -1) {
      return { start, text };
    }
  }
  return undefined;
}

/** A validated entry from parsed JSON, or undefined. Unknown keys are dropped. */
export function toEntry(value: unknown): LedgerEntry | undefined {
  if (!value || typeof value !== "object") {
    return undefined;
  }
  const v = value as Record<string, unknown>;
  const str = (x: unknown): x is string => typeof x === "string";
  const choice = v.choice_index ?? 0;
  const offset = v.start_offset;
  const state = v.state ?? "active";
  if (
    !str(v.completion_id) ||
    !v.completion_id ||
    !str(v.repository) ||
    !v.repository ||
    !str(v.file_path) ||
    !v.file_path ||
    !str(v.inserted_text) ||
    !(v.current_text === undefined || v.current_text === null || str(v.current_text)) ||
    typeof choice !== "number" ||
    !Number.isInteger(choice) ||
    choice < 0 ||
    typeof offset !== "number" ||
    !Number.isInteger(offset) ||
    offset < 0 ||
    (state !== "active" && state !== "removed") ||
    !str(v.updated_at) ||
    Number.isNaN(Date.parse(v.updated_at))
  ) {
    return undefined;
  }
  return {
    completion_id: v.completion_id,
    choice_index: choice,
    repository: v.repository,
    file_path: v.file_path,
    inserted_text: v.inserted_text,
    current_text: str(v.current_text) ? v.current_text : v.inserted_text,
    start_offset: offset,
    state,
    updated_at: v.updated_at,
  };
}

export function entryKey(completionId: string, choiceIndex = 0): string {
  return `${completionId}#${choiceIndex}`;
}

const keyOf = (e: Pick<LedgerEntry, "completion_id" | "choice_index">) => entryKey(e.completion_id, e.choice_index);

/** One JSON object per line, in the protocol's field order. */
export function toJsonl(entries: Iterable<LedgerEntry>): string {
  let out = "";
  for (const e of entries) {
    out += JSON.stringify(exportEntry(e)) + "\n";
  }
  return out;
}

/** Reads JSON Lines: the last line of each (completion_id, choice_index) wins; bad lines
 *  (a torn write, hand edits) are skipped and counted. */
export function parseJsonl(text: string): { entries: LedgerEntry[]; skipped: number; lines: number } {
  const latest = new Map<string, LedgerEntry>();
  let skipped = 0;
  let lines = 0;
  for (const line of text.split("\n")) {
    if (!line.trim()) {
      continue;
    }
    lines += 1;
    let entry: LedgerEntry | undefined;
    try {
      entry = toEntry(JSON.parse(line));
    } catch {
      entry = undefined;
    }
    if (!entry) {
      skipped += 1;
      continue;
    }
    latest.delete(keyOf(entry)); // keep the order of last appearance
    latest.set(keyOf(entry), entry);
  }
  return { entries: [...latest.values()], skipped, lines };
}

/** A copy with exactly the protocol's fields, in its order. */
export function exportEntry(e: LedgerEntry): LedgerEntry {
  return {
    completion_id: e.completion_id,
    choice_index: e.choice_index,
    repository: e.repository,
    file_path: e.file_path,
    inserted_text: e.inserted_text,
    current_text: e.current_text,
    start_offset: e.start_offset,
    state: e.state,
    updated_at: e.updated_at,
  };
}

/** An entry as it was at one version (what a save or a push carries). */
export interface Snapshot {
  key: string;
  version: number;
  entry: LedgerEntry;
}

export interface AcceptInput {
  completion_id: string;
  choice_index?: number;
  repository: string;
  file_path: string;
  /** The text as it is in the document. */
  text: string;
  start_offset: number;
}

export interface EntryChange {
  entry: LedgerEntry;
  effect: ChangeEffect;
}

interface Tracked {
  entry: LedgerEntry;
  version: number;
}

/**
 * The entries of one repository, with two kinds of dirtiness: not yet written to the ledger
 * file, and not yet pushed to the server. Each change bumps an entry's version; marking a
 * snapshot saved or pushed clears only that version, so a change made meanwhile stays dirty.
 */
export class Ledger {
  private readonly items = new Map<string, Tracked>();
  private readonly saved = new Map<string, number>();
  private readonly pushed = new Map<string, number>();

  constructor(private readonly now: () => number = Date.now) {}

  get size(): number {
    return this.items.size;
  }

  get(completionId: string, choiceIndex = 0): LedgerEntry | undefined {
    const item = this.items.get(entryKey(completionId, choiceIndex));
    return item && exportEntry(item.entry);
  }

  entries(): LedgerEntry[] {
    return [...this.items.values()].map((i) => exportEntry(i.entry));
  }

  /** Active entries of one file. */
  activeIn(filePath: string): LedgerEntry[] {
    return this.entries().filter((e) => e.file_path === filePath && e.state === "active");
  }

  /** Record an accepted completion (again: a later acceptance of the same id replaces it). */
  accept(input: AcceptInput): LedgerEntry {
    const entry: LedgerEntry = {
      completion_id: input.completion_id,
      choice_index: input.choice_index ?? 0,
      repository: input.repository,
      file_path: input.file_path,
      inserted_text: input.text,
      current_text: input.text,
      start_offset: Math.max(0, input.start_offset),
      state: "active",
      updated_at: "",
    };
    const key = keyOf(entry);
    const previous = this.items.get(key);
    entry.updated_at = this.timestamp(previous?.entry.updated_at);
    this.items.set(key, { entry, version: (previous?.version ?? 0) + 1 });
    return exportEntry(entry);
  }

  /**
   * Apply the changes of one document edit to the active entries of `filePath`, one after the
   * other in the order given: each change's offsets are taken as valid after the previous ones,
   * as VS Code reports them (it applies `contentChanges` in order to its own copy of the text;
   * the changes of a multi-cursor edit come highest offset first). Returns the entries that
   * moved or changed, with what happened to them.
   */
  applyChanges(filePath: string, changes: readonly TextChange[]): EntryChange[] {
    const tracked = [...this.items.values()].filter((i) => i.entry.file_path === filePath && i.entry.state === "active");
    if (!tracked.length || !changes.length) {
      return [];
    }
    const effects = new Map<Tracked, ChangeEffect>();
    for (const change of changes) {
      for (const item of tracked) {
        if (item.entry.state !== "active") {
          continue;
        }
        const outcome = applyChange(item.entry, change);
        if (outcome.effect === "none") {
          continue;
        }
        item.entry.start_offset = outcome.start_offset;
        item.entry.current_text = outcome.current_text;
        if (outcome.effect === "removed") {
          item.entry.state = "removed";
        }
        effects.set(item, strongest(effects.get(item), outcome.effect));
      }
    }
    const out: EntryChange[] = [];
    for (const [item, effect] of effects) {
      this.touch(item);
      out.push({ entry: exportEntry(item.entry), effect });
    }
    return out;
  }

  /** A file (or a folder: every file under it) was renamed. */
  renameFile(oldPath: string, newPath: string): number {
    let moved = 0;
    for (const item of this.items.values()) {
      const path = item.entry.file_path;
      if (path === oldPath || path.startsWith(oldPath + "/")) {
        item.entry.file_path = newPath + path.slice(oldPath.length);
        this.touch(item);
        moved += 1;
      }
    }
    return moved;
  }

  /**
   * Check the active entries of `filePath` against its text (opened after changes made outside
   * the editor: a checkout, another tool): an entry whose text is not at its offset moves to
   * the nearest occurrence of its text. An entry whose text is nowhere is left as it is (CI
   * searches for the text anyway). Returns the entries that moved.
   */
  reconcile(filePath: string, documentText: string): LedgerEntry[] {
    const moved: LedgerEntry[] = [];
    for (const item of this.items.values()) {
      const e = item.entry;
      if (e.file_path !== filePath || e.state !== "active" || !e.current_text) {
        continue;
      }
      if (documentText.startsWith(e.current_text, e.start_offset)) {
        continue;
      }
      const found = findNearest(documentText, e.current_text, e.start_offset);
      if (found !== -1) {
        e.start_offset = found;
        this.touch(item);
        moved.push(exportEntry(e));
      }
    }
    return moved;
  }

  /**
   * Entries read from the ledger file (or another window's): an entry newer than the one held
   * replaces it. They count as saved; as pushed only when `pushed` (else they go to the server
   * again, which keeps the newer of the two).
   */
  load(entries: Iterable<LedgerEntry>, options: { pushed?: boolean } = {}): number {
    let taken = 0;
    for (const raw of entries) {
      const entry = exportEntry(raw);
      const key = keyOf(entry);
      const held = this.items.get(key);
      if (held && Date.parse(held.entry.updated_at) >= Date.parse(entry.updated_at)) {
        continue;
      }
      const version = (held?.version ?? 0) + 1;
      this.items.set(key, { entry, version });
      this.saved.set(key, version);
      if (options.pushed) {
        this.pushed.set(key, version);
      }
      taken += 1;
    }
    return taken;
  }

  /** Drop entries last updated before `cutoff` (ms since the epoch) from memory. */
  prune(cutoff: number): number {
    let dropped = 0;
    for (const [key, item] of this.items) {
      if (Date.parse(item.entry.updated_at) < cutoff) {
        this.items.delete(key);
        this.saved.delete(key);
        this.pushed.delete(key);
        dropped += 1;
      }
    }
    return dropped;
  }

  pendingSave(): Snapshot[] {
    return this.pending(this.saved);
  }

  markSaved(snapshots: Iterable<Snapshot>): void {
    this.mark(this.saved, snapshots);
  }

  pendingPush(): Snapshot[] {
    return this.pending(this.pushed);
  }

  markPushed(snapshots: Iterable<Snapshot>): void {
    this.mark(this.pushed, snapshots);
  }

  private pending(done: Map<string, number>): Snapshot[] {
    const out: Snapshot[] = [];
    for (const [key, item] of this.items) {
      if ((done.get(key) ?? 0) < item.version) {
        out.push({ key, version: item.version, entry: exportEntry(item.entry) });
      }
    }
    return out;
  }

  private mark(done: Map<string, number>, snapshots: Iterable<Snapshot>): void {
    for (const s of snapshots) {
      if ((done.get(s.key) ?? 0) < s.version) {
        done.set(s.key, s.version);
      }
    }
  }

  private touch(item: Tracked): void {
    item.version += 1;
    item.entry.updated_at = this.timestamp(item.entry.updated_at);
  }

  /** Now, but later than `previous`: the server ignores an update older than what it holds. */
  private timestamp(previous?: string): string {
    let ms = this.now();
    const before = previous ? Date.parse(previous) : Number.NaN;
    if (!Number.isNaN(before) && ms <= before) {
      ms = before + 1;
    }
    return new Date(ms).toISOString();
  }
}

const STRENGTH: Record<ChangeEffect, number> = { none: 0, shifted: 1, relocated: 2, edited: 3, removed: 4 };

function strongest(a: ChangeEffect | undefined, b: ChangeEffect): ChangeEffect {
  return a === undefined || STRENGTH[b] > STRENGTH[a] ? b : a;
}
