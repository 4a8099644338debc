// Completion requests: the body sent to `POST /v1/completions` (the text around the cursor, cut
// to windows) and the reading of its answer, streamed (server-sent events) or not.
// No VS Code API here.

import { KaizenClient, KaizenError } from "./client";

export interface CompletionSettings {
  model: string;
  maxTokens: number;
  prefixChars: number;
  suffixChars: number;
  singleLine: boolean;
  /** Greedy (0) unless set. */
  temperature?: number;
}

export interface CompletionContext {
  /** VS Code's language id, e.g. `python`. */
  language: string;
  /** Relative to the repository root, `/` separators. */
  filePath: string;
  /** The protocol's repository id. */
  repository: string;
}

export interface CompletionBody {
  model: string;
  prompt: string;
  suffix: string;
  max_tokens: number;
  temperature: number;
  stream: boolean;
  single_line: boolean;
  context: { language: string; file_path: string; repository: string };
}

export interface Windows {
  prefix: string;
  suffix: string;
  /** Offset in the document where `prefix` starts. */
  prefixStart: number;
  /** Offset in the document where `suffix` ends. */
  suffixEnd: number;
}

const isHighSurrogate = (code: number) => code >= 0xd800 && code <= 0xdbff;

/**
 * The text sent around the cursor: at most `prefixChars` before it and `suffixChars` after it.
 * The prefix starts at a line start and the suffix ends after a line end where that loses less
 * than half of the window (a window inside one long line is cut mid-line); a cut never splits
 * a surrogate pair.
 */
export function contextWindows(text: string, offset: number, prefixChars: number, suffixChars: number): Windows {
  const cursor = Math.max(0, Math.min(offset, text.length));
  const prefixBudget = Math.max(0, Math.floor(prefixChars));
  const suffixBudget = Math.max(0, Math.floor(suffixChars));

  let start = Math.max(0, cursor - prefixBudget);
  if (start > 0 && text[start - 1] !== "\n") {
    const newline = text.indexOf("\n", start);
    if (newline !== -1 && newline + 1 < cursor && newline + 1 - start <= prefixBudget / 2) {
      start = newline + 1;
    } else if (isHighSurrogate(text.charCodeAt(start - 1))) {
      start += 1; // do not begin with the second half of a pair
    }
  }

  let end = Math.min(text.length, cursor + suffixBudget);
  if (end < text.length && text[end - 1] !== "\n") {
    const newline = text.lastIndexOf("\n", end - 1);
    if (newline >= cursor && end - (newline + 1) <= suffixBudget / 2) {
      end = newline + 1;
    } else if (end > cursor && isHighSurrogate(text.charCodeAt(end - 1))) {
      end -= 1; // do not end with the first half of a pair
    }
  }
  return { prefix: text.slice(start, cursor), suffix: text.slice(cursor, end), prefixStart: start, suffixEnd: end };
}

/** The request body for the cursor at `offset` of `text`. */
export function buildCompletionBody(
  text: string,
  offset: number,
  settings: CompletionSettings,
  context: CompletionContext,
  options: { stream?: boolean } = {},
): CompletionBody {
  const { prefix, suffix } = contextWindows(text, offset, settings.prefixChars, settings.suffixChars);
  return {
    model: settings.model,
    prompt: prefix,
    suffix,
    max_tokens: settings.maxTokens,
    temperature: settings.temperature ?? 0,
    stream: options.stream ?? true,
    single_line: settings.singleLine,
    context: { language: context.language, file_path: context.filePath, repository: context.repository },
  };
}

/**
 * Server-sent events, fed in chunks of any size: returns the `data` of each complete event
 * (several `data:` lines of one event are joined by newlines; comments and other fields are
 * skipped). `end()` returns an event left unterminated by the end of the stream.
 */
export class SseParser {
  private buffer = "";
  private data: string[] = [];

  push(chunk: string): string[] {
    this.buffer += chunk;
    const out: string[] = [];
    for (;;) {
      const newline = this.buffer.search(/\r\n|\r|\n/);
      if (newline === -1) {
        break;
      }
      // A lone \r at the end of the buffer may be the first half of \r\n: wait for more.
      if (this.buffer[newline] === "\r" && newline === this.buffer.length - 1) {
        break;
      }
      const width = this.buffer.startsWith("\r\n", newline) ? 2 : 1;
      const line = this.buffer.slice(0, newline);
      this.buffer = this.buffer.slice(newline + width);
      this.line(line, out);
    }
    return out;
  }

  end(): string[] {
    const out: string[] = [];
    if (this.buffer) {
      this.line(this.buffer.replace(/\r$/, ""), out);
      this.buffer = "";
    }
    this.line("", out);
    return out;
  }

  private line(line: string, out: string[]): void {
    if (line === "") {
      if (this.data.length) {
        out.push(this.data.join("\n"));
        this.data = [];
      }
      return;
    }
    if (line.startsWith(":")) {
      return; // a comment (keep-alive)
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    if (field !== "data") {
      return;
    }
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) {
      value = value.slice(1);
    }
    this.data.push(value);
  }
}

export interface CompletionResult {
  /** The completion's id (`cmpl-...`), what events and the ledger name. */
  id: string;
  /** Choice 0's text as the server sent it. */
  text: string;
  finishReason?: string;
}

interface ErrorPayload {
  message?: unknown;
  code?: unknown;
  type?: unknown;
}

function inBandError(error: ErrorPayload | string): KaizenError {
  if (typeof error === "string") {
    return new KaizenError(error, { status: 500, kind: "transient" });
  }
  const str = (v: unknown) => (typeof v === "string" ? v : undefined);
  return new KaizenError(str(error.message) ?? "generation failed", {
    status: 500,
    code: str(error.code),
    type: str(error.type),
    kind: "transient",
  });
}

/** Assembles a streamed completion from the `data` of its events. */
export class CompletionAssembler {
  id = "";
  text = "";
  finishReason: string | undefined;
  done = false;
  error: KaizenError | undefined;

  /** Takes one event's data; returns false once the stream is over (`[DONE]` or an error). */
  data(data: string): boolean {
    if (this.done) {
      return false;
    }
    const trimmed = data.trim();
    if (trimmed === "[DONE]") {
      this.done = true;
      return false;
    }
    if (!trimmed) {
      return true;
    }
    let payload: { id?: unknown; choices?: unknown; error?: ErrorPayload | string };
    try {
      payload = JSON.parse(trimmed);
    } catch {
      this.error = new KaizenError(`malformed event in the completion stream: ${trimmed.slice(0, 100)}`, { kind: "transient" });
      this.done = true;
      return false;
    }
    if (payload && payload.error !== undefined && payload.error !== null) {
      this.error = inBandError(payload.error);
      this.done = true;
      return false;
    }
    if (typeof payload?.id === "string" && payload.id) {
      this.id ||= payload.id;
    }
    if (Array.isArray(payload?.choices)) {
      for (const choice of payload.choices as { index?: unknown; text?: unknown; finish_reason?: unknown }[]) {
        if ((choice?.index ?? 0) !== 0) {
          continue;
        }
        if (typeof choice.text === "string") {
          this.text += choice.text;
        }
        if (typeof choice.finish_reason === "string") {
          this.finishReason = choice.finish_reason;
        }
      }
    }
    return true;
  }

  result(): CompletionResult {
    if (this.error) {
      throw this.error;
    }
    if (!this.id) {
      throw new KaizenError("the completion stream carried no completion id", { kind: "transient" });
    }
    return { id: this.id, text: this.text, finishReason: this.finishReason };
  }
}

/** Reads a whole SSE body into a completion; stops at `[DONE]` or an in-band error. */
export async function readCompletionStream(body: ReadableStream<Uint8Array> | null): Promise<CompletionResult> {
  const assembler = new CompletionAssembler();
  if (!body) {
    return assembler.result();
  }
  const parser = new SseParser();
  const decoder = new TextDecoder("utf-8");
  const reader = body.getReader();
  let open = true;
  try {
    while (open) {
      const { value, done } = await reader.read();
      const events = done ? [...parser.push(decoder.decode()), ...parser.end()] : parser.push(decoder.decode(value, { stream: true }));
      for (const data of events) {
        if (!assembler.data(data)) {
          open = false;
          break;
        }
      }
      if (done) {
        break;
      }
    }
  } finally {
    if (open) {
      reader.releaseLock();
    } else {
      await reader.cancel().catch(() => undefined); // [DONE] seen: nothing more to read
    }
  }
  if (!assembler.done) {
    throw new KaizenError("the completion stream ended before [DONE]", { kind: "transient" });
  }
  return assembler.result();
}

/** A non-streamed answer: `{"id", "choices": [{"index", "text", "finish_reason"}]}`. */
export function parseCompletionJson(payload: unknown): CompletionResult {
  const assembler = new CompletionAssembler();
  assembler.data(JSON.stringify(payload ?? {}));
  return assembler.result();
}

/** Asks for a completion and returns choice 0, assembled when streamed. */
export function requestCompletion(
  client: KaizenClient,
  body: CompletionBody,
  options: { signal?: AbortSignal; timeoutMs?: number } = {},
): Promise<CompletionResult> {
  return client.exchange(
    "POST",
    "/v1/completions",
    async (response) => {
      const type = response.headers.get("content-type") ?? "";
      if (body.stream && !type.includes("application/json")) {
        return readCompletionStream(response.body);
      }
      return parseCompletionJson(await response.json());
    },
    { body, signal: options.signal, timeoutMs: options.timeoutMs ?? 30_000 },
  );
}
