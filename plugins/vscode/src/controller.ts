// The inline-completion logic behind the VS Code provider, without the VS Code API: debounce,
// cancellation, the request, clean-up, and what became of each completion shown (accepted,
// partly kept, rejected), reported as events. extension.ts adapts VS Code's objects to it.

import { isAbortError, KaizenClient, KaizenError } from "./client";
import { EventBatcher } from "./events";
import { postprocess } from "./postprocess";
import { buildCompletionBody, CompletionBody, CompletionResult, requestCompletion } from "./request";
import { sleep, systemTimers, Timers } from "./retry";

export interface Settings {
  enabled: boolean;
  serverUrl: string;
  model: string;
  maxTokens: number;
  debounceMs: number;
  prefixChars: number;
  suffixChars: number;
  singleLine: boolean;
}

/** The defaults; package.json's `contributes.configuration` declares the same (a test checks). */
export const DEFAULT_SETTINGS: Settings = {
  enabled: true,
  serverUrl: "http://127.0.0.1:8000",
  model: "qwen2.5-coder-0.5b-instruct",
  maxTokens: 64,
  debounceMs: 150,
  prefixChars: 3000,
  suffixChars: 1000,
  singleLine: false,
};

/** Settings from a `get(name)` (VS Code's configuration), each checked and bounded. */
export function readSettings(get: (name: keyof Settings) => unknown): Settings {
  const bool = (name: keyof Settings, fallback: boolean) => {
    const value = get(name);
    return typeof value === "boolean" ? value : fallback;
  };
  const int = (name: keyof Settings, fallback: number, min: number, max: number) => {
    const value = get(name);
    return typeof value === "number" && Number.isFinite(value) ? Math.min(max, Math.max(min, Math.round(value))) : fallback;
  };
  const text = (name: keyof Settings, fallback: string) => {
    const value = get(name);
    return typeof value === "string" && value.trim() ? value.trim() : fallback;
  };
  const d = DEFAULT_SETTINGS;
  return {
    enabled: bool("enabled", d.enabled),
    serverUrl: text("serverUrl", d.serverUrl),
    model: text("model", d.model),
    maxTokens: int("maxTokens", d.maxTokens, 1, 1024),
    debounceMs: int("debounceMs", d.debounceMs, 0, 10_000),
    prefixChars: int("prefixChars", d.prefixChars, 1, 1_000_000),
    suffixChars: int("suffixChars", d.suffixChars, 0, 1_000_000),
    singleLine: bool("singleLine", d.singleLine),
  };
}

export type State = "ready" | "requesting" | "error" | "no-token" | "disabled";

export interface Status {
  state: State;
  detail?: string;
}

/** The document at the moment of a request. */
export interface DocumentSnapshot {
  /** Identifies the document (its URI). */
  key: string;
  text: string;
  /** The cursor. */
  offset: number;
  languageId: string;
  /** Relative to the repository root. */
  filePath: string;
  repository: string;
}

/** What to show at the cursor. */
export interface Suggestion {
  completionId: string;
  choiceIndex: number;
  /** The text to insert at the cursor. */
  insertText: string;
  /** The whole completion as first shown (more than `insertText` when typing along it). */
  fullText: string;
  /** Where it was first shown. */
  shownOffset: number;
}

/** A completion the developer kept without the accept command (typed along it, or took it
 *  word by word): where it is in the document now and the text kept. */
export interface KeptRegion {
  completionId: string;
  choiceIndex: number;
  documentKey: string;
  offset: number;
  /** As it is in the document. */
  text: string;
  /** The whole completion was kept. */
  whole: boolean;
}

export type Complete = (client: KaizenClient, body: CompletionBody, signal: AbortSignal) => Promise<CompletionResult>;

export interface ControllerDeps {
  settings(): Settings;
  /** Undefined while there is no token. */
  client(): KaizenClient | undefined;
  events: EventBatcher;
  timers?: Timers;
  /** The current text of an open document, by key (to judge a completion after the fact). */
  documentText?(key: string): string | undefined;
  onStatus?(status: Status): void;
  /** A request failed (not cancelled). */
  onError?(error: KaizenError): void;
  onKept?(kept: KeptRegion): void;
  complete?: Complete;
}

/** What the document shows of the completion last shown. */
interface Shown {
  completionId: string;
  choiceIndex: number;
  documentKey: string;
  offset: number;
  /** The completion, `\n` line endings. */
  text: string;
  documentLength: number;
  /** Some text before and after the cursor when it was shown, to tell typing from other edits. */
  before: string;
  after: string;
  /** Longest `accepted_length` reported so far. */
  reported: number;
}

const CONTEXT = 64;
const MIN_KEPT = 2; // characters typed along a completion before it counts as partly kept
// A part kept goes to the ledger only from this many non-blank characters on: CI looks for the
// text in the file, and a short one ("re", "x = ") would be found anywhere.
const MIN_LEDGER = 10;

/** The text inserted at the completion's position since it was shown, when that is the only
 *  change (typing, or accepting word by word); `\n` line endings. */
function insertedSince(shown: Shown, text: string, cursor: number): string | undefined {
  const inserted = cursor - shown.offset;
  if (inserted < 0 || text.length - shown.documentLength !== inserted) {
    return undefined;
  }
  if (text.slice(shown.offset - shown.before.length, shown.offset) !== shown.before) {
    return undefined;
  }
  if (!text.startsWith(shown.after, cursor)) {
    return undefined;
  }
  return text.slice(shown.offset, cursor).replace(/\r\n/g, "\n");
}

function commonPrefix(a: string, b: string): number {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) {
    i++;
  }
  return i;
}

/** The document span holding the first `length` characters (`\n` counted once) of a region
 *  starting at `offset`, `\r\n` counting as one. */
function rawSpan(text: string, offset: number, length: number): string {
  let j = offset;
  for (let i = 0; i < length && j < text.length; i++) {
    j += text.startsWith("\r\n", j) ? 2 : 1;
  }
  return text.slice(offset, j);
}

export class CompletionController {
  private shown: Shown | undefined;
  private readonly timers: Timers;
  private readonly complete: Complete;
  private cooldownUntil = 0;
  private failures = 0;
  private sequence = 0;
  private settled: Status = { state: "ready" };
  private readonly acceptedRecently: string[] = [];

  constructor(private readonly deps: ControllerDeps) {
    this.timers = deps.timers ?? systemTimers;
    this.complete = deps.complete ?? ((client, body, signal) => requestCompletion(client, body, { signal }));
  }

  /** The current status, as last reported. */
  get status(): Status {
    return this.settled;
  }

  /** The completion waiting for its fate, if any (for tests and diagnostics). */
  get pending(): { completionId: string; text: string } | undefined {
    return this.shown && { completionId: this.shown.completionId, text: this.shown.text };
  }

  /** A completion for the cursor in `doc`, or undefined; `signal` aborts when the user types on. */
  async provide(doc: DocumentSnapshot, signal: AbortSignal): Promise<Suggestion | undefined> {
    const settings = this.deps.settings();
    if (!settings.enabled) {
      this.setStatus({ state: "disabled" });
      this.settle(doc);
      return undefined;
    }
    const client = this.deps.client();
    if (!client) {
      this.setStatus({ state: "no-token", detail: "run “Kaizen: Set API Token”" });
      return undefined;
    }
    if (this.settled.state === "disabled" || this.settled.state === "no-token") {
      this.setStatus({ state: "ready" });
    }

    // Typing along the completion shown: show the rest of it, no new request.
    const along = this.along(doc);
    if (along) {
      return along;
    }
    if (!(await sleep(this.timers, settings.debounceMs, signal))) {
      return undefined; // the user typed on
    }
    this.settle(doc);
    if (this.timers.now() < this.cooldownUntil) {
      return undefined;
    }
    const body = buildCompletionBody(
      doc.text,
      doc.offset,
      settings,
      { language: doc.languageId, filePath: doc.filePath, repository: doc.repository },
      { stream: true },
    );
    if (!body.prompt) {
      return undefined; // the start of the file: the server refuses an empty prompt
    }
    const sequence = ++this.sequence;
    this.report({ state: "requesting" });
    let result: CompletionResult;
    try {
      result = await this.complete(client, body, signal);
    } catch (err) {
      if (sequence === this.sequence) {
        if (isAbortError(err) || signal.aborted) {
          this.report(this.settled);
        } else {
          this.failed(err);
        }
      }
      return undefined;
    }
    if (sequence === this.sequence) {
      this.failures = 0;
      this.cooldownUntil = 0;
      this.setStatus({ state: "ready" });
    }
    if (signal.aborted) {
      return undefined;
    }
    const text = postprocess(result.text, { suffix: body.suffix, singleLine: settings.singleLine });
    if (!text) {
      return undefined;
    }
    this.settle(doc); // a completion shown by an overlapping request
    this.deps.events.add({ completion_id: result.id, choice_index: 0, type: "shown" });
    this.shown = {
      completionId: result.id,
      choiceIndex: 0,
      documentKey: doc.key,
      offset: doc.offset,
      text,
      documentLength: doc.text.length,
      before: doc.text.slice(Math.max(0, doc.offset - CONTEXT), doc.offset),
      after: doc.text.slice(doc.offset, doc.offset + CONTEXT),
      reported: 0,
    };
    return { completionId: result.id, choiceIndex: 0, insertText: text, fullText: text, shownOffset: doc.offset };
  }

  /** The accept command of a shown item ran. Returns false when it was reported already. */
  accepted(completionId: string, choiceIndex = 0): boolean {
    if (this.shown?.completionId === completionId && this.shown.choiceIndex === choiceIndex) {
      this.shown = undefined;
    }
    const key = `${completionId}#${choiceIndex}`;
    if (this.acceptedRecently.includes(key)) {
      return false;
    }
    this.remember(key);
    this.deps.events.add({ completion_id: completionId, choice_index: choiceIndex, type: "accepted" });
    return true;
  }

  /** VS Code accepted part of an item (word by word), `acceptedLength` characters in all. */
  partiallyAccepted(completionId: string, choiceIndex: number, acceptedLength: number): void {
    const shown = this.shown?.completionId === completionId && this.shown.choiceIndex === choiceIndex ? this.shown : undefined;
    if (shown) {
      if (acceptedLength <= shown.reported) {
        return;
      }
      shown.reported = acceptedLength;
    }
    this.deps.events.add({ completion_id: completionId, choice_index: choiceIndex, type: "partially_accepted", accepted_length: acceptedLength });
  }

  /**
   * Decide the fate of the completion last shown, the developer having moved on (`current` is
   * the document now, when known): all of it typed along → `accepted`; a part of at least
   * MIN_KEPT characters → `partially_accepted`; else `rejected`.
   */
  settle(current?: DocumentSnapshot): void {
    const shown = this.shown;
    if (!shown) {
      return;
    }
    this.shown = undefined;
    let text: string | undefined;
    let cursor: number | undefined;
    if (current && current.key === shown.documentKey) {
      text = current.text;
      cursor = current.offset;
    } else {
      text = this.deps.documentText?.(shown.documentKey);
      cursor = text === undefined ? undefined : shown.offset + (text.length - shown.documentLength);
    }
    const inserted = text !== undefined && cursor !== undefined ? insertedSince(shown, text, cursor) : undefined;
    const kept = inserted === undefined ? 0 : commonPrefix(inserted, shown.text);
    const region = (whole: boolean): KeptRegion => ({
      completionId: shown.completionId,
      choiceIndex: shown.choiceIndex,
      documentKey: shown.documentKey,
      offset: shown.offset,
      text: rawSpan(text ?? "", shown.offset, kept),
      whole,
    });
    if (kept === shown.text.length) {
      if (this.accepted(shown.completionId, shown.choiceIndex)) {
        this.deps.onKept?.(region(true));
      }
      return;
    }
    if (kept >= MIN_KEPT && shown.text.slice(0, kept).trim()) {
      if (kept > shown.reported) {
        this.deps.events.add({
          completion_id: shown.completionId,
          choice_index: shown.choiceIndex,
          type: "partially_accepted",
          accepted_length: kept,
        });
      }
      if (shown.text.slice(0, kept).replace(/\s/g, "").length >= MIN_LEDGER) {
        this.deps.onKept?.(region(false));
      }
      return;
    }
    if (shown.reported > 0) {
      return; // partly accepted through VS Code, then typed over: reported already
    }
    this.deps.events.add({ completion_id: shown.completionId, choice_index: shown.choiceIndex, type: "rejected" });
  }

  /** Settle what is pending (deactivation). */
  dispose(): void {
    this.settle();
  }

  private along(doc: DocumentSnapshot): Suggestion | undefined {
    const shown = this.shown;
    if (!shown || shown.documentKey !== doc.key) {
      return undefined;
    }
    const inserted = insertedSince(shown, doc.text, doc.offset);
    if (inserted === undefined || inserted.length >= shown.text.length || !shown.text.startsWith(inserted)) {
      return undefined;
    }
    return {
      completionId: shown.completionId,
      choiceIndex: shown.choiceIndex,
      insertText: shown.text.slice(inserted.length),
      fullText: shown.text,
      shownOffset: shown.offset,
    };
  }

  private failed(err: unknown): void {
    const error = err instanceof KaizenError ? err : new KaizenError((err as Error)?.message ?? String(err));
    const now = this.timers.now();
    let detail = error.message;
    if (error.kind === "auth") {
      detail = `the server refused the token (${error.status}): ${error.message}`;
      this.cooldownUntil = now + 30_000;
    } else if (error.kind === "rejected") {
      // This request was refused (too long a context, ...): the next one may do.
    } else if (error.status === 404) {
      this.cooldownUntil = now + 30_000; // an unknown model: a settings problem
    } else {
      this.failures += 1;
      const backoff = Math.min(30_000, 1_000 * 2 ** (this.failures - 1));
      this.cooldownUntil = now + Math.max(backoff, error.retryAfterMs ?? 0);
    }
    this.setStatus({ state: "error", detail });
    this.deps.onError?.(error);
  }

  private remember(key: string): void {
    this.acceptedRecently.push(key);
    if (this.acceptedRecently.length > 100) {
      this.acceptedRecently.shift();
    }
  }

  /** A lasting status (ready, error, ...), restored after a cancelled request. */
  private setStatus(status: Status): void {
    this.settled = status;
    this.report(status);
  }

  private report(status: Status): void {
    this.deps.onStatus?.(status);
  }
}
