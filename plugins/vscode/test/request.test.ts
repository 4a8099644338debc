import assert from "node:assert/strict";
import { test } from "node:test";
import { postprocess } from "../src/postprocess";
import { buildBody, SseParser, windows } from "../src/request";

const settings = { model: "m", maxTokens: 32, prefixChars: 3000, suffixChars: 1000, singleLine: false };
const context = { language: "python", filePath: "src/a.py", repository: "github.com/acme/app" };

test("the body carries prefix, suffix and the IDE context", () => {
  const text = "def add(a, b):\n    \n\nprint(add(1, 2))\n";
  const body = buildBody(text, 19, settings, context);
  assert.equal(body.prompt, "def add(a, b):\n    ");
  assert.equal(body.suffix, "\n\nprint(add(1, 2))\n");
  assert.deepEqual(body.context, { language: "python", file_path: "src/a.py", repository: "github.com/acme/app" });
  assert.equal(body.stream, true);
  assert.equal(body.max_tokens, 32);
});

test("windows are cut at line boundaries", () => {
  const text = "aaaa\nbbbb\ncc|dd\neeee\nffff\n";
  const offset = text.indexOf("|");
  const { prefix, suffix } = windows(text, offset, 5, 9);
  assert.equal(prefix, "cc"); // "bbbb\ncc" is 7 chars: cut to the line start
  assert.equal(suffix, "|dd\neeee\n");
});

test("SSE chunks split anywhere assemble into the completion", () => {
  const stream =
    'data: {"id":"cmpl-1","choices":[{"index":0,"text":"return ","finish_reason":null}]}\n\n' +
    'data: {"id":"cmpl-1","choices":[{"index":0,"text":"a + b","finish_reason":"stop"}]}\n\n' +
    "data: [DONE]\n\n";
  const parser = new SseParser();
  for (let i = 0; i < stream.length; i += 7) {
    parser.push(stream.slice(i, i + 7));
  }
  assert.deepEqual(parser.state, { id: "cmpl-1", text: "return a + b", finishReason: "stop", done: true });
});

test("an error chunk inside the stream is reported", () => {
  const parser = new SseParser();
  parser.push('data: {"error":{"message":"Generation failed: boom","type":"api_error"}}\n\ndata: [DONE]\n\n');
  assert.equal(parser.state.error, "Generation failed: boom");
  assert.equal(parser.state.done, true);
});

test("post-processing trims, cuts single lines and drops suffix echoes", () => {
  assert.equal(postprocess("a + b\n\n  \n", "\n", false), "a + b");
  assert.equal(postprocess("x = 1\ny = 2", "", true), "x = 1");
  assert.equal(postprocess("print(add(1, 2))", "\n\nprint(add(1, 2))\n", false), "");
  assert.equal(postprocess("   \n", "", false), "");
});
