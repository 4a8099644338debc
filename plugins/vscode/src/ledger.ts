// The workspace ledger of accepted completions (plugins/PROTOCOL.md): where each one lives and
// its current text, kept up to date as the developer edits around it.

export interface LedgerEntry {
  completion_id: string;
  choice_index: number;
  repository: string;
  file_path: string;
  inserted_text: string;
  current_text: string;
  start_offset: number;
  state: "active" | "removed";
  updated_at: string;
}

/** One edit of a document: `length` characters at `offset` replaced by `text`. */
export interface TextChange {
  offset: number;
  length: number;
  text: string;
}

export class Ledger {
  private entries = new Map<string, LedgerEntry>();
  private dirty = new Set<string>();

  constructor(private readonly now: () => Date = () => new Date()) {}

  private key(entry: Pick<LedgerEntry, "completion_id" | "choice_index">): string {
    return `${entry.completion_id}#${entry.choice_index}`;
  }

  accept(entry: Omit<LedgerEntry, "current_text" | "state" | "updated_at" | "choice_index"> & { choice_index?: number }): LedgerEntry {
    const full: LedgerEntry = {
      choice_index: 0,
      ...entry,
      current_text: entry.inserted_text,
      state: "active",
      updated_at: this.now().toISOString(),
    };
    this.entries.set(this.key(full), full);
    this.dirty.add(this.key(full));
    return full;
  }

  all(): LedgerEntry[] {
    return [...this.entries.values()];
  }

  /**
   * Applies an edit of `filePath` whose new content is `documentText`; returns the entries whose
   * region text changed (for `edited` events). Regions after the edit shift; an edit touching a
   * region changes its text; a region deleted entirely is `removed`.
   */
  applyChange(filePath: string, change: TextChange, documentText: string): LedgerEntry[] {
    const changed: LedgerEntry[] = [];
    const changeEnd = change.offset + change.length;
    const delta = change.text.length - change.length;
    for (const entry of this.entries.values()) {
      if (entry.file_path !== filePath || entry.state !== "active") {
        continue;
      }
      const start = entry.start_offset;
      const end = start + entry.current_text.length;
      if (change.offset >= end) {
        continue; // after the region (typing right after it does not extend it)
      }
      if (changeEnd <= start) {
        entry.start_offset += delta; // before the region: it moves
      } else if (change.offset <= start && changeEnd >= end) {
        // The whole region was deleted or replaced: the completion is gone.
        entry.state = "removed";
        entry.current_text = "";
        entry.start_offset = change.offset;
        changed.push(entry);
      } else {
        // Inside or overlapping: the region now spans the old one plus the edit.
        const newStart = Math.min(start, change.offset);
        const newEnd = Math.max(end, changeEnd) + delta;
        entry.start_offset = newStart;
        entry.current_text = documentText.slice(newStart, newEnd);
        changed.push(entry);
      }
      entry.updated_at = this.now().toISOString();
      this.dirty.add(this.key(entry));
    }
    return changed;
  }

  /** Entries changed since the last `markPushed`. */
  pendingPush(): LedgerEntry[] {
    return [...this.dirty].map((k) => this.entries.get(k)!).filter(Boolean);
  }

  markPushed(entries: LedgerEntry[]): void {
    for (const entry of entries) {
      this.dirty.delete(this.key(entry));
    }
  }

  /** JSON Lines, one entry per line. */
  serialise(): string {
    return this.all().map((e) => JSON.stringify(e)).join("\n") + (this.entries.size ? "\n" : "");
  }

  /** Reads JSON Lines; a later line for the same completion wins; bad lines are skipped. */
  static parse(text: string, now?: () => Date): Ledger {
    const ledger = new Ledger(now);
    for (const line of text.split(/\r?\n/)) {
      if (!line.trim()) {
        continue;
      }
      try {
        const entry = JSON.parse(line) as LedgerEntry;
        if (entry.completion_id && typeof entry.start_offset === "number") {
          ledger.entries.set(ledger.key(entry), { ...entry, choice_index: entry.choice_index ?? 0 });
        }
      } catch {
        // a torn line from a crash: skip it
      }
    }
    return ledger;
  }
}
