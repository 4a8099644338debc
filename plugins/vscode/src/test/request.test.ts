import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { KaizenClient, KaizenError } from "../client";
import {
  buildCompletionBody,
  CompletionAssembler,
  contextWindows,
  parseCompletionJson,
  readCompletionStream,
  requestCompletion,
  SseParser,
} from "../request";

const settings = { model: "qwen2.5-coder-0.5b-instruct", maxTokens: 64, prefixChars: 3000, suffixChars: 1000, singleLine: false };
const context = { language: "python", filePath: "src/app/util.py", repository: "github.com/acme/app" };

function streamOf(chunks: (string | Uint8Array)[]): ReadableStream<Uint8Array> {
  const encoder = new TextEncoder();
  return new ReadableStream<Uint8Array>({
    start(controller) {
      for (const chunk of chunks) {
        controller.enqueue(typeof chunk === "string" ? encoder.encode(chunk) : chunk);
      }
      controller.close();
    },
  });
}

const chunk = (text: string, id = "cmpl-1", finish: string | null = null) =>
  `data: ${JSON.stringify({ id, object: "text_completion", choices: [{ index: 0, text, finish_reason: finish, logprobs: null }] })}\n\n`;

describe("contextWindows", () => {
  test("a small document goes whole", () => {
    const text = "import os\n\ndef f():\n    return 1\n";
    const w = contextWindows(text, 20, 3000, 1000);
    assert.equal(w.prefix, text.slice(0, 20));
    assert.equal(w.suffix, text.slice(20));
    assert.equal(w.prefix + w.suffix, text);
  });

  test("the prefix starts at a line start, the suffix ends after a line end", () => {
    const lines = Array.from({ length: 200 }, (_, i) => `line ${String(i).padStart(3, "0")}`); // 8 chars + \n
    const text = lines.join("\n") + "\n";
    const cursor = text.indexOf("line 100") + 4;
    const w = contextWindows(text, cursor, 95, 95);
    assert.ok(w.prefix.length <= 95 && w.suffix.length <= 95);
    assert.ok(w.prefixStart === 0 || text[w.prefixStart - 1] === "\n", "prefix begins a line");
    assert.ok(w.suffix.endsWith("\n"), "suffix ends a line");
    assert.equal(w.prefix, text.slice(w.prefixStart, cursor));
    assert.equal(w.suffix, text.slice(cursor, w.suffixEnd));
    assert.ok(w.prefix.startsWith("line 090"), w.prefix);
    assert.equal(w.prefix.length, 9 * 10 + 4);
  });

  test("inside one long line the window is cut mid-line rather than emptied", () => {
    const text = "x".repeat(5000) + "\n" + "y".repeat(5000);
    const w = contextWindows(text, 4000, 3000, 1000);
    assert.equal(w.prefix, "x".repeat(3000));
    assert.equal(w.suffix, "x".repeat(1000));
    // A line end in the second half of the window is not taken: too much would be lost.
    const w2 = contextWindows(text, 5001 + 10, 100, 100);
    assert.equal(w2.prefix, "x".repeat(89) + "\n" + "y".repeat(10));
  });

  test("a cut never splits a surrogate pair", () => {
    const text = "😀".repeat(10); // 20 UTF-16 units
    const w = contextWindows(text, 10, 3, 3);
    assert.equal(w.prefix, "😀");
    assert.equal(w.suffix, "😀");
    assert.doesNotThrow(() => encodeURIComponent(w.prefix + w.suffix));
  });

  test("the cursor is clamped to the text", () => {
    assert.deepEqual(contextWindows("abc", 99, 10, 10), { prefix: "abc", suffix: "", prefixStart: 0, suffixEnd: 3 });
    assert.deepEqual(contextWindows("abc", 0, 10, 0), { prefix: "", suffix: "", prefixStart: 0, suffixEnd: 0 });
  });
});

describe("buildCompletionBody", () => {
  test("prompt is the text before the cursor, suffix the text after it, with Kaizen's fields", () => {
    const text = "def add(a, b):\n    \n\nprint(add(1, 2))\n";
    const body = buildCompletionBody(text, 19, settings, context);
    assert.deepEqual(body, {
      model: "qwen2.5-coder-0.5b-instruct",
      prompt: "def add(a, b):\n    ",
      suffix: "\n\nprint(add(1, 2))\n",
      max_tokens: 64,
      temperature: 0,
      stream: true,
      single_line: false,
      context: { language: "python", file_path: "src/app/util.py", repository: "github.com/acme/app" },
    });
  });

  test("single_line, stream and the windows follow the settings", () => {
    const body = buildCompletionBody("a\nb\nc\nd\n", 4, { ...settings, singleLine: true, prefixChars: 2, suffixChars: 2 }, context, { stream: false });
    assert.equal(body.single_line, true);
    assert.equal(body.stream, false);
    assert.equal(body.prompt, "b\n");
    assert.equal(body.suffix, "c\n");
  });
});

describe("SseParser", () => {
  test("events split anywhere, CRLF, comments, multi-line data", () => {
    const raw = ": keep-alive\r\ndata: {\"a\":1}\r\n\r\ndata: line one\ndata: line two\n\nevent: x\ndata: [DONE]\n\n";
    for (let size = 1; size <= raw.length; size++) {
      const parser = new SseParser();
      const out: string[] = [];
      for (let i = 0; i < raw.length; i += size) {
        out.push(...parser.push(raw.slice(i, i + size)));
      }
      out.push(...parser.end());
      assert.deepEqual(out, ['{"a":1}', "line one\nline two", "[DONE]"], `chunk size ${size}`);
    }
  });

  test("an event left unterminated at the end is still delivered", () => {
    const parser = new SseParser();
    assert.deepEqual(parser.push("data: [DONE]"), []);
    assert.deepEqual(parser.end(), ["[DONE]"]);
  });
});

describe("reading a completion stream", () => {
  test("text is assembled, the id taken, [DONE] ends it", async () => {
    const body = streamOf([chunk("re"), chunk("turn a"), chunk(" + b", "cmpl-1", "stop"), "data: [DONE]\n\n"]);
    assert.deepEqual(await readCompletionStream(body), { id: "cmpl-1", text: "return a + b", finishReason: "stop" });
  });

  test("a multi-byte character split between network chunks survives", async () => {
    const bytes = new TextEncoder().encode(chunk("naïve → ✓ 😀") + "data: [DONE]\n\n");
    const parts: Uint8Array[] = [];
    for (let i = 0; i < bytes.length; i += 3) {
      parts.push(bytes.slice(i, i + 3));
    }
    assert.equal((await readCompletionStream(streamOf(parts))).text, "naïve → ✓ 😀");
  });

  test("an in-band error chunk fails the completion with the server's message", async () => {
    const error = { error: { message: "Generation failed: engine died", type: "api_error", param: null, code: "generation_failed" } };
    const body = streamOf([chunk("x"), `data: ${JSON.stringify(error)}\n\n`, "data: [DONE]\n\n"]);
    await assert.rejects(readCompletionStream(body), (err: KaizenError) => {
      assert.ok(err instanceof KaizenError);
      assert.equal(err.message, "Generation failed: engine died");
      assert.equal(err.code, "generation_failed");
      assert.equal(err.kind, "transient");
      return true;
    });
  });

  test("a stream cut before [DONE] is an error, not a short completion", async () => {
    await assert.rejects(readCompletionStream(streamOf([chunk("ret")])), /before \[DONE\]/);
  });

  test("other choices and usage chunks are ignored", () => {
    const a = new CompletionAssembler();
    a.data(JSON.stringify({ id: "cmpl-2", choices: [{ index: 1, text: "no" }, { index: 0, text: "yes" }] }));
    a.data(JSON.stringify({ id: "cmpl-2", choices: [], usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 } }));
    assert.equal(a.data("[DONE]"), false);
    assert.deepEqual(a.result(), { id: "cmpl-2", text: "yes", finishReason: undefined });
  });

  test("a non-streamed answer", () => {
    const payload = { id: "cmpl-3", object: "text_completion", choices: [{ index: 0, text: "result = a + b", finish_reason: "stop" }] };
    assert.deepEqual(parseCompletionJson(payload), { id: "cmpl-3", text: "result = a + b", finishReason: "stop" });
    assert.throws(() => parseCompletionJson({ error: { message: "bad" } }), /bad/);
  });
});

describe("requestCompletion", () => {
  test("posts the body with the token, reads a stream", async () => {
    let seen: { url: string; init: RequestInit } | undefined;
    const fetch = async (url: string, init: RequestInit) => {
      seen = { url, init };
      return new Response(streamOf([chunk("result = a + b"), "data: [DONE]\n\n"]), {
        status: 200,
        headers: { "content-type": "text/event-stream" },
      });
    };
    const client = new KaizenClient({ baseUrl: "http://kaizen.test:8000/", token: "kz_secret", fetch });
    const body = buildCompletionBody("def add(a, b):\n    ", 19, settings, context);
    assert.deepEqual(await requestCompletion(client, body), { id: "cmpl-1", text: "result = a + b", finishReason: undefined });
    assert.equal(seen!.url, "http://kaizen.test:8000/v1/completions");
    assert.equal(seen!.init.method, "POST");
    assert.equal((seen!.init.headers as Record<string, string>).Authorization, "Bearer kz_secret");
    assert.deepEqual(JSON.parse(seen!.init.body as string), body);
  });

  test("reads a JSON answer when not streaming", async () => {
    const fetch = async () =>
      new Response(JSON.stringify({ id: "cmpl-9", choices: [{ index: 0, text: "x", finish_reason: "length" }] }), {
        headers: { "content-type": "application/json" },
      });
    const client = new KaizenClient({ baseUrl: "http://kaizen.test", token: "t", fetch });
    const body = buildCompletionBody("a", 1, settings, context, { stream: false });
    assert.equal((await requestCompletion(client, body)).id, "cmpl-9");
  });
});
