import assert from "node:assert/strict";
import { createServer, Server } from "node:http";
import { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";
import { errorKind, isAbortError, KaizenClient, KaizenError } from "../client";
import { buildCompletionBody, requestCompletion } from "../request";

const json = (body: unknown, status = 200, headers: Record<string, string> = {}) =>
  new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json", ...headers } });

describe("KaizenClient with a scripted fetch", () => {
  test("bearer token, JSON body, base URL without a trailing slash or /v1", async () => {
    const seen: { url: string; init: RequestInit }[] = [];
    const fetch = async (url: string, init: RequestInit) => {
      seen.push({ url, init });
      return json({ stored: 1, duplicates: 0, unknown_completion_ids: [] });
    };
    for (const baseUrl of ["http://k.test:8000", "http://k.test:8000/", "http://k.test:8000/v1/"]) {
      const client = new KaizenClient({ baseUrl, token: "kz_abc", fetch });
      assert.deepEqual(await client.postEvents([{ id: "e" }]), { stored: 1, duplicates: 0, unknown_completion_ids: [] });
    }
    assert.deepEqual(
      seen.map((s) => s.url),
      Array(3).fill("http://k.test:8000/v1/events"),
    );
    const headers = seen[0].init.headers as Record<string, string>;
    assert.equal(headers.Authorization, "Bearer kz_abc");
    assert.equal(headers["Content-Type"], "application/json");
    assert.deepEqual(JSON.parse(seen[0].init.body as string), { events: [{ id: "e" }] });
  });

  test("errors carry the API's message, code and kind", async () => {
    const cases: [Response, string, string | undefined, string][] = [
      [json({ error: { message: "Invalid or revoked token.", type: "authentication_error", param: null, code: null } }, 401), "Invalid or revoked token.", undefined, "auth"],
      [json({ error: { message: "Role ide may not do this.", type: "permission_error" } }, 403), "Role ide may not do this.", undefined, "auth"],
      [json({ error: { message: "No event was stored. Refused 1 (not_owner).", code: "refused_completion" } }, 403), "No event was stored. Refused 1 (not_owner).", "refused_completion", "rejected"],
      [json({ error: { message: "No event names a completion this server knows: cmpl-x.", code: "unknown_completion" } }, 404), "No event names a completion this server knows: cmpl-x.", "unknown_completion", "unknown_completion"],
      [json({ error: { message: "Invalid request: 'events': too long.", code: null } }, 400), "Invalid request: 'events': too long.", undefined, "rejected"],
      [json({ error: { message: "The model is loading.", code: "engine_not_ready" } }, 503, { "Retry-After": "5" }), "The model is loading.", "engine_not_ready", "transient"],
      [new Response("<html>Bad Gateway</html>", { status: 502, statusText: "Bad Gateway" }), "HTTP 502 Bad Gateway: <html>Bad Gateway</html>", undefined, "transient"],
    ];
    for (const [response, message, code, kind] of cases) {
      const client = new KaizenClient({ baseUrl: "http://k.test", token: "t", fetch: async () => response });
      await assert.rejects(client.putLedger([]), (err: KaizenError) => {
        assert.ok(err instanceof KaizenError);
        assert.equal(err.message, message);
        assert.equal(err.code, code);
        assert.equal(err.kind, kind);
        assert.equal(errorKind(err), kind);
        return true;
      });
    }
    const loading = new KaizenClient({ baseUrl: "http://k.test", token: "t", fetch: async () => json({ error: { message: "x" } }, 503, { "Retry-After": "5" }) });
    await assert.rejects(loading.putLedger([]), (err: KaizenError) => err.retryAfterMs === 5000);
  });

  test("an unreachable server says where it looked", async () => {
    const fetch = async () => {
      throw Object.assign(new TypeError("fetch failed"), { cause: { code: "ECONNREFUSED" } });
    };
    const client = new KaizenClient({ baseUrl: "http://127.0.0.1:9", token: "t", fetch });
    await assert.rejects(client.postEvents([]), (err: KaizenError) => {
      assert.match(err.message, /cannot reach the Kaizen server at http:\/\/127\.0\.0\.1:9 \(ECONNREFUSED\)/);
      assert.equal(err.kind, "transient");
      return true;
    });
  });

  test("a time-out aborts the request", async () => {
    let signal: AbortSignal | undefined;
    const fetch = (_url: string, init: RequestInit) =>
      new Promise<Response>((_resolve, reject) => {
        signal = init.signal ?? undefined;
        init.signal?.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
      });
    const client = new KaizenClient({ baseUrl: "http://k.test", token: "t", fetch, timeoutMs: 20 });
    await assert.rejects(client.postEvents([]), (err: KaizenError) => {
      assert.match(err.message, /did not answer within 0.02 s/);
      assert.equal(err.kind, "transient");
      return true;
    });
    assert.equal(signal?.aborted, true);
  });

  test("the caller's signal cancels, as an abort", async () => {
    const controller = new AbortController();
    const fetch = (_url: string, init: RequestInit) =>
      new Promise<Response>((_resolve, reject) => {
        init.signal?.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
      });
    const client = new KaizenClient({ baseUrl: "http://k.test", token: "t", fetch });
    const pending = client.json("GET", "/v1/models", { signal: controller.signal });
    controller.abort();
    await assert.rejects(pending, (err: unknown) => isAbortError(err) && errorKind(err) === "aborted");
    // Already aborted: nothing is sent.
    let called = false;
    const idle = new KaizenClient({ baseUrl: "http://k.test", token: "t", fetch: async () => ((called = true), json({})) });
    await assert.rejects(idle.json("GET", "/x", { signal: controller.signal }), (err: unknown) => isAbortError(err));
    assert.equal(called, false);
  });
});

describe("KaizenClient against a local HTTP server (real fetch, real streaming)", () => {
  let server: Server;
  let baseUrl = "";
  const received: { method?: string; url?: string; auth?: string; body: string }[] = [];

  before(async () => {
    server = createServer((req, res) => {
      let body = "";
      req.on("data", (c) => (body += c));
      req.on("end", () => {
        received.push({ method: req.method, url: req.url, auth: req.headers.authorization, body });
        if (req.url === "/v1/completions") {
          res.writeHead(200, { "content-type": "text/event-stream" });
          const pieces = ["result", " = a", " + b"];
          let i = 0;
          const next = () => {
            if (i < pieces.length) {
              res.write(`data: ${JSON.stringify({ id: "cmpl-local", choices: [{ index: 0, text: pieces[i++], finish_reason: null }] })}\n\n`);
              setTimeout(next, 5);
            } else {
              res.end("data: [DONE]\n\n");
            }
          };
          next();
        } else if (req.url === "/v1/slow") {
          setTimeout(() => res.end("{}"), 2_000);
        } else {
          res.writeHead(401, { "content-type": "application/json" });
          res.end(JSON.stringify({ error: { message: "Invalid or revoked token.", type: "authentication_error", param: null, code: null } }));
        }
      });
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  after(() => {
    server.closeAllConnections();
    server.close();
  });

  test("a streamed completion is assembled", async () => {
    const client = new KaizenClient({ baseUrl, token: "kz_local" });
    const body = buildCompletionBody("def add(a, b):\n    ", 19, { model: "m", maxTokens: 8, prefixChars: 100, suffixChars: 100, singleLine: false }, { language: "python", filePath: "a.py", repository: "local/x" });
    assert.deepEqual(await requestCompletion(client, body), { id: "cmpl-local", text: "result = a + b", finishReason: undefined });
    const request = received.find((r) => r.url === "/v1/completions")!;
    assert.equal(request.auth, "Bearer kz_local");
    assert.equal(JSON.parse(request.body).suffix, "");
  });

  test("an error answer and a time-out", async () => {
    const client = new KaizenClient({ baseUrl, token: "bad", timeoutMs: 100 });
    await assert.rejects(client.postEvents([]), /Invalid or revoked token/);
    await assert.rejects(client.json("GET", "/v1/slow"), /did not answer/);
  });
});
