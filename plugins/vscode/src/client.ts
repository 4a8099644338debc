// A small client of the Kaizen API over fetch: bearer token, time-outs through AbortController,
// the server's error shape turned into messages. No VS Code API here.

export type Fetch = (input: string, init: RequestInit) => Promise<Response>;

/** How a failed delivery should be treated by the senders of events and ledger entries. */
export type ErrorKind =
  | "aborted" // the caller cancelled (the user typed on)
  | "transient" // network, time-out, 5xx, 429: retry later
  | "auth" // 401/403: retry later, tell the user (but see "refused_completion" below)
  | "unknown_completion" // 404 naming only completions the server does not know
  | "rejected"; // 400/413/422: this batch will never be accepted as it is

export class KaizenError extends Error {
  readonly status?: number;
  readonly code?: string;
  readonly type?: string;
  readonly param?: string;
  /** From `Retry-After`, when the server sent one. */
  readonly retryAfterMs?: number;
  readonly kind: ErrorKind;

  constructor(
    message: string,
    options: { status?: number; code?: string; type?: string; param?: string; retryAfterMs?: number; kind?: ErrorKind } = {},
  ) {
    super(message);
    this.name = "KaizenError";
    this.status = options.status;
    this.code = options.code;
    this.type = options.type;
    this.param = options.param;
    this.retryAfterMs = options.retryAfterMs;
    this.kind = options.kind ?? kindOfStatus(options.status, options.code);
  }
}

function kindOfStatus(status: number | undefined, code: string | undefined): ErrorKind {
  if (status === undefined) {
    return "transient";
  }
  if (status === 403 && code === "refused_completion") {
    // Every item named another owner's completion (another developer's, or one received under
    // a token of another name): no retry will change that, so the senders drop it like a 400.
    return "rejected";
  }
  if (status === 401 || status === 403) {
    return "auth";
  }
  if (status === 404 && code === "unknown_completion") {
    return "unknown_completion";
  }
  if (status === 400 || status === 413 || status === 422) {
    return "rejected";
  }
  return "transient";
}

export function isAbortError(err: unknown): boolean {
  return (
    (err instanceof KaizenError && err.kind === "aborted") ||
    (typeof err === "object" && err !== null && (err as { name?: unknown }).name === "AbortError")
  );
}

/** How a delivery failure should be handled; anything that is not a KaizenError is transient. */
export function errorKind(err: unknown): ErrorKind {
  if (err instanceof KaizenError) {
    return err.kind;
  }
  return isAbortError(err) ? "aborted" : "transient";
}

function parseRetryAfter(value: string | null): number | undefined {
  if (!value) {
    return undefined;
  }
  const seconds = Number(value);
  if (Number.isFinite(seconds) && seconds >= 0) {
    return seconds * 1000;
  }
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - Date.now());
}

/** The KaizenError for a non-2xx response, from the API's `{"error": {...}}` shape when it has one. */
export async function errorFromResponse(response: Response): Promise<KaizenError> {
  let message = `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
  let detail: { message?: unknown; code?: unknown; type?: unknown; param?: unknown } | undefined;
  try {
    const text = await response.text();
    try {
      const payload = JSON.parse(text) as { error?: typeof detail; detail?: unknown };
      detail = payload && typeof payload.error === "object" ? payload.error : undefined;
      if (!detail && typeof payload?.detail === "string") {
        detail = { message: payload.detail };
      }
    } catch {
      if (text.trim()) {
        message += `: ${text.trim().slice(0, 200)}`;
      }
    }
  } catch {
    // the body could not be read: keep the status line
  }
  const str = (v: unknown) => (typeof v === "string" && v ? v : undefined);
  return new KaizenError(str(detail?.message) ?? message, {
    status: response.status,
    code: str(detail?.code),
    type: str(detail?.type),
    param: str(detail?.param),
    retryAfterMs: parseRetryAfter(response.headers.get("retry-after")),
  });
}

export interface ClientOptions {
  baseUrl: string;
  token: string;
  fetch?: Fetch;
  /** Default time limit of one request, in ms (the whole exchange, body included). */
  timeoutMs?: number;
  userAgent?: string;
}

export interface RequestOptions {
  body?: unknown;
  signal?: AbortSignal;
  timeoutMs?: number;
}

/**
 * An exchange with the server: `read` gets the response (2xx only) and must consume its body;
 * the time limit covers the reading too, and the caller's `signal` aborts it.
 */
export class KaizenClient {
  readonly baseUrl: string;
  private readonly token: string;
  private readonly fetchImpl: Fetch;
  private readonly timeoutMs: number;
  private readonly userAgent: string | undefined;

  constructor(options: ClientOptions) {
    this.baseUrl = options.baseUrl.trim().replace(/\/+$/, "").replace(/\/v1$/, "");
    this.token = options.token;
    const globalFetch = (globalThis as { fetch?: Fetch }).fetch;
    const chosen = options.fetch ?? (globalFetch ? globalFetch.bind(globalThis) : undefined);
    if (!chosen) {
      throw new Error("no fetch implementation available (Node 18 or later is needed)");
    }
    this.fetchImpl = chosen;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.userAgent = options.userAgent;
  }

  async exchange<T>(method: string, path: string, read: (response: Response) => Promise<T>, options: RequestOptions = {}): Promise<T> {
    const controller = new AbortController();
    const outer = options.signal;
    const onAbort = () => controller.abort();
    if (outer?.aborted) {
      throw new KaizenError("cancelled", { kind: "aborted" });
    }
    outer?.addEventListener("abort", onAbort, { once: true });
    const limit = options.timeoutMs ?? this.timeoutMs;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, limit);
    const headers: Record<string, string> = {
      Authorization: `Bearer ${this.token}`,
      Accept: "application/json, text/event-stream",
    };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
    }
    if (this.userAgent) {
      headers["User-Agent"] = this.userAgent;
    }
    try {
      const response = await this.fetchImpl(this.baseUrl + path, {
        method,
        headers,
        body: options.body === undefined ? undefined : JSON.stringify(options.body),
        signal: controller.signal,
      });
      if (!response.ok) {
        throw await errorFromResponse(response);
      }
      return await read(response);
    } catch (err) {
      if (outer?.aborted) {
        throw new KaizenError("cancelled", { kind: "aborted" });
      }
      if (timedOut) {
        throw new KaizenError(`the Kaizen server at ${this.baseUrl} did not answer within ${limit / 1000} s`, { kind: "transient" });
      }
      if (err instanceof KaizenError) {
        throw err;
      }
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      const reason = cause?.code ?? cause?.message ?? (err as Error).message;
      throw new KaizenError(`cannot reach the Kaizen server at ${this.baseUrl} (${reason})`, { kind: "transient" });
    } finally {
      clearTimeout(timer);
      outer?.removeEventListener("abort", onAbort);
    }
  }

  /** A JSON request whose JSON answer is returned. */
  json<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    return this.exchange(method, path, async (response) => (await response.json()) as T, options);
  }

  postEvents(events: unknown[], signal?: AbortSignal): Promise<EventsResponse> {
    return this.json("POST", "/v1/events", { body: { events }, signal });
  }

  putLedger(entries: unknown[], signal?: AbortSignal): Promise<LedgerPutResponse> {
    return this.json("PUT", "/v1/ledger", { body: { entries }, signal });
  }
}

export interface EventsResponse {
  stored: number;
  duplicates: number;
  unknown_completion_ids: string[];
}

export interface LedgerPutResponse {
  stored: number;
  unknown_completion_ids: string[];
}
