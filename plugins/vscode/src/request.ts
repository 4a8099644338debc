// Building completion requests and reading server-sent events: no VS Code API here.

export interface CompletionSettings {
  model: string;
  maxTokens: number;
  prefixChars: number;
  suffixChars: number;
  singleLine: boolean;
}

export interface CompletionContext {
  language: string;
  filePath: string;
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

/** Cut the prefix window at a line start and the suffix window at a line end, where possible. */
export function windows(text: string, offset: number, prefixChars: number, suffixChars: number) {
  let start = Math.max(0, offset - prefixChars);
  if (start > 0) {
    const newline = text.indexOf("\n", start);
    if (newline !== -1 && newline < offset) {
      start = newline + 1;
    }
  }
  let end = Math.min(text.length, offset + suffixChars);
  if (end < text.length) {
    const newline = text.lastIndexOf("\n", end);
    if (newline > offset) {
      end = newline + 1;
    }
  }
  return { prefix: text.slice(start, offset), suffix: text.slice(offset, end) };
}

export function buildBody(
  text: string,
  offset: number,
  settings: CompletionSettings,
  context: CompletionContext,
  stream = true,
): CompletionBody {
  const { prefix, suffix } = windows(text, offset, settings.prefixChars, settings.suffixChars);
  return {
    model: settings.model,
    prompt: prefix,
    suffix,
    max_tokens: settings.maxTokens,
    temperature: 0,
    stream,
    single_line: settings.singleLine,
    context: { language: context.language, file_path: context.filePath, repository: context.repository },
  };
}

export interface StreamState {
  id?: string;
  text: string;
  finishReason?: string;
  error?: string;
  done: boolean;
}

/** Feeds SSE text in arbitrary chunks; keeps a partial line until its end arrives. */
export class SseParser {
  private buffer = "";
  readonly state: StreamState = { text: "", done: false };

  push(chunk: string): void {
    this.buffer += chunk;
    let newline: number;
    while ((newline = this.buffer.indexOf("\n")) !== -1) {
      const line = this.buffer.slice(0, newline).replace(/\r$/, "");
      this.buffer = this.buffer.slice(newline + 1);
      this.line(line);
    }
  }

  private line(line: string): void {
    if (!line.startsWith("data:")) {
      return;
    }
    const data = line.slice(5).trim();
    if (data === "[DONE]") {
      this.state.done = true;
      return;
    }
    const payload = JSON.parse(data);
    if (payload.error) {
      this.state.error = String(payload.error.message ?? "generation failed");
      return;
    }
    this.state.id = payload.id ?? this.state.id;
    for (const choice of payload.choices ?? []) {
      if (choice.index === 0) {
        this.state.text += choice.text ?? "";
        if (choice.finish_reason) {
          this.state.finishReason = choice.finish_reason;
        }
      }
    }
  }
}
