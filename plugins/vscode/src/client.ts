// A small API client over fetch: bearer token, time-outs, the server's error messages.

export type Fetch = typeof fetch;

export class KaizenError extends Error {
  constructor(message: string, readonly status?: number) {
    super(message);
  }
}

export class KaizenClient {
  constructor(
    private readonly baseUrl: string,
    private readonly token: string,
    private readonly fetchImpl: Fetch = fetch,
    private readonly timeoutMs = 10_000,
  ) {}

  /** Sends a request; `signal` lets the caller cancel (the user typed on). */
  async request(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<Response> {
    const timeout = AbortSignal.timeout(this.timeoutMs);
    const combined = signal ? AbortSignal.any([signal, timeout]) : timeout;
    let response: Response;
    try {
      response = await this.fetchImpl(this.baseUrl.replace(/\/+$/, "") + path, {
        method,
        headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: combined,
      });
    } catch (err) {
      if (signal?.aborted) {
        throw err;
      }
      throw new KaizenError(`Kaizen server unreachable at ${this.baseUrl}: ${(err as Error).message}`);
    }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try {
        const payload = (await response.json()) as { error?: { message?: string } };
        message = payload.error?.message ?? message;
      } catch {
        // not JSON: keep the status line
      }
      throw new KaizenError(message, response.status);
    }
    return response;
  }

  async postJson<T>(method: string, path: string, body: unknown): Promise<T> {
    const response = await this.request(method, path, body);
    return (await response.json()) as T;
  }
}
