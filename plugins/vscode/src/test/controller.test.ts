import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { KaizenClient, KaizenError } from "../client";
import { Complete, CompletionController, DEFAULT_SETTINGS, DocumentSnapshot, KeptRegion, readSettings, Settings, Status } from "../controller";
import { EventBatcher } from "../events";
import { CompletionBody } from "../request";
import { FakeTimers } from "./helpers";

interface Call {
  body: CompletionBody;
  signal: AbortSignal;
}

function setup(options: { settings?: Partial<Settings>; token?: boolean; answer?: (call: Call, n: number) => Promise<{ id: string; text: string }> } = {}) {
  const timers = new FakeTimers();
  const events = new EventBatcher(async () => ({}), { timers, intervalMs: 1e9 });
  const calls: Call[] = [];
  const statuses: Status[] = [];
  const errors: KaizenError[] = [];
  const kept: KeptRegion[] = [];
  const documents = new Map<string, string>();
  let n = 0;
  const complete: Complete = async (_client, body, signal) => {
    const call = { body, signal };
    calls.push(call);
    n += 1;
    return options.answer ? options.answer(call, n) : { id: `cmpl-${n}`, text: "result = a + b" };
  };
  const client = new KaizenClient({ baseUrl: "http://k.test", token: "t", fetch: async () => new Response("{}") });
  const controller = new CompletionController({
    settings: () => ({ ...DEFAULT_SETTINGS, debounceMs: 150, ...options.settings }),
    client: () => (options.token === false ? undefined : client),
    events,
    timers,
    complete,
    documentText: (key) => documents.get(key),
    onStatus: (s) => statuses.push(s),
    onError: (e) => errors.push(e),
    onKept: (k) => kept.push(k),
  });
  const types = () => events.queued().map((e) => `${e.type}:${e.completion_id}${e.accepted_length !== null ? `:${e.accepted_length}` : ""}`);
  return { timers, events, calls, statuses, errors, kept, documents, controller, types };
}

const PREFIX = "def add(a, b):\n    ";
const SUFFIX = "\n    return result\n";
const doc = (text = PREFIX + SUFFIX, offset = PREFIX.length, key = "file:///w/src/calc.py"): DocumentSnapshot => ({
  key,
  text,
  offset,
  languageId: "python",
  filePath: "src/calc.py",
  repository: "github.com/acme/app",
});

/** `provide` with the clock run past the debounce. */
async function provide(s: ReturnType<typeof setup>, snapshot: DocumentSnapshot, signal = new AbortController().signal) {
  const pending = s.controller.provide(snapshot, signal);
  await s.timers.advance(1_000);
  return pending;
}

describe("CompletionController", () => {
  test("asks after the debounce with prompt, suffix, stream and context, and reports shown", async () => {
    const s = setup();
    const pending = s.controller.provide(doc(), new AbortController().signal);
    await s.timers.advance(149);
    assert.equal(s.calls.length, 0, "still debouncing");
    await s.timers.advance(1);
    const suggestion = await pending;
    assert.equal(s.calls.length, 1);
    const body = s.calls[0].body;
    assert.equal(body.prompt, PREFIX);
    assert.equal(body.suffix, SUFFIX);
    assert.equal(body.stream, true);
    assert.equal(body.max_tokens, 64);
    assert.equal(body.model, "qwen2.5-coder-0.5b-instruct");
    assert.deepEqual(body.context, { language: "python", file_path: "src/calc.py", repository: "github.com/acme/app" });
    assert.deepEqual(suggestion, { completionId: "cmpl-1", choiceIndex: 0, insertText: "result = a + b", fullText: "result = a + b", shownOffset: PREFIX.length });
    assert.deepEqual(s.types(), ["shown:cmpl-1"]);
    assert.deepEqual(s.statuses.map((x) => x.state), ["requesting", "ready"]);
  });

  test("typing during the debounce cancels: no request", async () => {
    const s = setup();
    const abort = new AbortController();
    const pending = s.controller.provide(doc(), abort.signal);
    await s.timers.advance(100);
    abort.abort();
    assert.equal(await pending, undefined);
    await s.timers.advance(1_000);
    assert.equal(s.calls.length, 0);
  });

  test("typing during the request aborts it: nothing shown, status back to ready", async () => {
    let release: () => void = () => undefined;
    const s = setup({
      answer: (call) =>
        new Promise((resolve, reject) => {
          call.signal.addEventListener("abort", () => reject(new KaizenError("cancelled", { kind: "aborted" })));
          release = () => resolve({ id: "cmpl-x", text: "late" });
        }),
    });
    const abort = new AbortController();
    const pending = s.controller.provide(doc(), abort.signal);
    await s.timers.advance(150);
    assert.equal(s.calls.length, 1);
    abort.abort();
    assert.equal(await pending, undefined);
    release();
    assert.deepEqual(s.types(), []);
    assert.equal(s.statuses.at(-1)!.state, "ready");
  });

  test("the completion is cleaned up; a blank one shows nothing", async () => {
    const s = setup({ answer: async (_c, n) => ({ id: `cmpl-${n}`, text: n === 1 ? "result = a + b\n    return result\n" : "  \n" }) });
    assert.equal((await provide(s, doc()))!.insertText, "result = a + b");
    s.controller.accepted("cmpl-1");
    assert.equal(await provide(s, doc()), undefined);
    assert.deepEqual(s.types(), ["shown:cmpl-1", "accepted:cmpl-1"]);
  });

  test("a shown completion that is not taken is rejected at the next request", async () => {
    const s = setup();
    await provide(s, doc());
    const elsewhere = doc("import os\n" + PREFIX + SUFFIX, 10 + PREFIX.length);
    await provide(s, elsewhere);
    assert.deepEqual(s.types(), ["shown:cmpl-1", "rejected:cmpl-1", "shown:cmpl-2"]);
  });

  test("the accept command: accepted, never rejected afterwards, reported once", async () => {
    const s = setup();
    await provide(s, doc());
    assert.equal(s.controller.accepted("cmpl-1"), true);
    assert.equal(s.controller.accepted("cmpl-1"), false);
    const after = PREFIX + "result = a + b" + SUFFIX;
    await provide(s, doc(after, PREFIX.length + 14));
    assert.deepEqual(s.types(), ["shown:cmpl-1", "accepted:cmpl-1", "shown:cmpl-2"]);
  });

  test("typing along the completion shows the rest of it without asking again", async () => {
    const s = setup();
    await provide(s, doc());
    const typed = PREFIX + "resu" + SUFFIX;
    const suggestion = await s.controller.provide(doc(typed, PREFIX.length + 4), new AbortController().signal);
    assert.deepEqual(suggestion, { completionId: "cmpl-1", choiceIndex: 0, insertText: "lt = a + b", fullText: "result = a + b", shownOffset: PREFIX.length });
    assert.equal(s.calls.length, 1);
    assert.deepEqual(s.types(), ["shown:cmpl-1"]);
  });

  test("typing all of it counts as accepted and is handed to the ledger", async () => {
    const s = setup();
    await provide(s, doc());
    const typed = PREFIX + "result = a + b" + SUFFIX;
    await provide(s, doc(typed, PREFIX.length + 14));
    assert.deepEqual(s.types().slice(0, 2), ["shown:cmpl-1", "accepted:cmpl-1"]);
    assert.deepEqual(s.kept, [{ completionId: "cmpl-1", choiceIndex: 0, documentKey: "file:///w/src/calc.py", offset: PREFIX.length, text: "result = a + b", whole: true }]);
  });

  test("keeping a part then typing something else is a partial acceptance", async () => {
    const s = setup({ answer: async (_c, n) => ({ id: `cmpl-${n}`, text: "result = compute(a, b)" }) });
    await provide(s, doc());
    const typed = PREFIX + "result = compute(b, a)" + SUFFIX; // kept "result = compute(", then differed
    await provide(s, doc(typed, PREFIX.length + 22));
    assert.deepEqual(s.types().slice(0, 2), ["shown:cmpl-1", "partially_accepted:cmpl-1:17"]);
    assert.deepEqual(s.kept, [{ completionId: "cmpl-1", choiceIndex: 0, documentKey: "file:///w/src/calc.py", offset: PREFIX.length, text: "result = compute(", whole: false }]);
  });

  test("a short part kept is reported, but not put in the ledger", async () => {
    const s = setup();
    await provide(s, doc());
    const typed = PREFIX + "result = a * 2" + SUFFIX; // kept "result = a ": 8 characters besides spaces
    await provide(s, doc(typed, PREFIX.length + 14));
    assert.deepEqual(s.types().slice(0, 2), ["shown:cmpl-1", "partially_accepted:cmpl-1:11"]);
    assert.deepEqual(s.kept, []);
  });

  test("one matching character typed is no partial acceptance", async () => {
    const s = setup();
    await provide(s, doc());
    const typed = PREFIX + "rx" + SUFFIX;
    await provide(s, doc(typed, PREFIX.length + 2));
    assert.deepEqual(s.types().slice(0, 2), ["shown:cmpl-1", "rejected:cmpl-1"]);
  });

  test("VS Code's partial acceptance is reported with the accepted length, not repeated", async () => {
    const s = setup();
    await provide(s, doc());
    s.controller.partiallyAccepted("cmpl-1", 0, 7);
    s.controller.partiallyAccepted("cmpl-1", 0, 7);
    s.controller.partiallyAccepted("cmpl-1", 0, 9);
    const typed = PREFIX + "result = " + SUFFIX;
    await provide(s, doc(typed, PREFIX.length + 9));
    assert.deepEqual(s.types().slice(0, 3), ["shown:cmpl-1", "partially_accepted:cmpl-1:7", "partially_accepted:cmpl-1:9"]);
    assert.equal(s.types().filter((t) => t.startsWith("rejected")).length, 0);
  });

  test("the fate of a completion in another document is judged from that document", async () => {
    const s = setup();
    await provide(s, doc());
    s.documents.set("file:///w/src/calc.py", PREFIX + SUFFIX); // unchanged: not taken
    await provide(s, doc("x = 1\n", 6, "file:///w/other.py"));
    assert.deepEqual(s.types().slice(0, 2), ["shown:cmpl-1", "rejected:cmpl-1"]);
  });

  test("nothing before the cursor: no request (the server refuses an empty prompt)", async () => {
    const s = setup();
    assert.equal(await provide(s, doc("\nprint(1)\n", 0)), undefined);
    assert.equal(s.calls.length, 0);
  });

  test("disabled, or without a token: no request, and the status says why", async () => {
    const off = setup({ settings: { enabled: false } });
    assert.equal(await provide(off, doc()), undefined);
    assert.equal(off.calls.length, 0);
    assert.equal(off.statuses.at(-1)!.state, "disabled");
    const anonymous = setup({ token: false });
    assert.equal(await provide(anonymous, doc()), undefined);
    assert.equal(anonymous.calls.length, 0);
    assert.equal(anonymous.statuses.at(-1)!.state, "no-token");
  });

  test("a failing server: error status, a cool-down without requests, then recovery", async () => {
    let fail = true;
    const s = setup({
      answer: async (_c, n) => {
        if (fail) throw new KaizenError("cannot reach the Kaizen server at http://k.test (ECONNREFUSED)", { kind: "transient" });
        return { id: `cmpl-${n}`, text: "ok()" };
      },
    });
    assert.equal(await provide(s, doc()), undefined);
    assert.equal(s.statuses.at(-1)!.state, "error");
    assert.match(s.statuses.at(-1)!.detail!, /ECONNREFUSED/);
    assert.equal(s.errors.length, 1);
    // 1 s of cool-down, of which the debounce used 150 ms and the test clock 1 s.
    fail = false;
    const before = s.calls.length;
    assert.equal((await provide(s, doc()))!.insertText, "ok()");
    assert.equal(s.calls.length, before + 1);
    assert.equal(s.statuses.at(-1)!.state, "ready");
  });

  test("a refused token cools down for longer and is reported as an auth error", async () => {
    const s = setup({ answer: async () => Promise.reject(new KaizenError("Invalid or revoked token.", { status: 401 })) });
    await provide(s, doc());
    assert.equal(s.errors[0].kind, "auth");
    assert.match(s.statuses.at(-1)!.detail!, /refused the token/);
    await provide(s, doc());
    assert.equal(s.calls.length, 1, "no request during the cool-down");
    await s.timers.advance(30_000);
    await provide(s, doc());
    assert.equal(s.calls.length, 2);
  });
});

describe("readSettings", () => {
  test("defaults, and bounds on bad values", () => {
    assert.deepEqual(readSettings(() => undefined), DEFAULT_SETTINGS);
    const values: Record<string, unknown> = { maxTokens: 99999, debounceMs: -5, prefixChars: "many", serverUrl: "  http://kaizen:8000/ ", singleLine: true };
    const s = readSettings((name) => values[name]);
    assert.equal(s.maxTokens, 1024);
    assert.equal(s.debounceMs, 0);
    assert.equal(s.prefixChars, 3000);
    assert.equal(s.serverUrl, "http://kaizen:8000/");
    assert.equal(s.singleLine, true);
  });
});
