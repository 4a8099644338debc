// extension.ts in plain Node, against a fake `vscode` module and a local fake Kaizen server:
// request, ghost text, acceptance, ledger updates, events and the ledger on the wire.

import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, Server } from "node:http";
import { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { after, before, describe, test } from "node:test";
import { createFakeVscode, FakeDocument, fakeContext, InlineCompletionItem, installFakeVscode, Position, Uri } from "./fakeVscode";
import { settle } from "./helpers";

const fake = createFakeVscode();
installFakeVscode(fake);
const extension = require("../extension") as typeof import("../extension");

interface Received {
  method: string;
  url: string;
  auth: string | undefined;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- JSON as the server got it
  body: any;
}

const PREFIX = "def add(a, b):\n    ";
const SUFFIX = "\n    return result\n";

describe("the extension, wired to a fake VS Code", () => {
  let server: Server;
  const received: Received[] = [];
  const workspace = mkdtempSync(path.join(tmpdir(), "kaizen-ext-"));

  before(async () => {
    server = createServer((req, res) => {
      let raw = "";
      req.on("data", (c) => (raw += c));
      req.on("end", () => {
        const body = raw ? JSON.parse(raw) : undefined;
        received.push({ method: req.method!, url: req.url!, auth: req.headers.authorization, body });
        if (req.url === "/v1/completions") {
          res.writeHead(200, { "content-type": "text/event-stream" });
          for (const text of ["result = a", " + b\n", "    return result\n"]) {
            res.write(`data: ${JSON.stringify({ id: "cmpl-e2e", object: "text_completion", choices: [{ index: 0, text, finish_reason: null }] })}\n\n`);
          }
          res.end("data: [DONE]\n\n");
        } else if (req.url === "/v1/events") {
          res.writeHead(200, { "content-type": "application/json" });
          res.end(JSON.stringify({ stored: body.events.length, duplicates: 0, unknown_completion_ids: [] }));
        } else if (req.url === "/v1/ledger") {
          res.writeHead(200, { "content-type": "application/json" });
          res.end(JSON.stringify({ stored: body.entries.length, unknown_completion_ids: [] }));
        } else {
          res.writeHead(404, { "content-type": "application/json" });
          res.end(JSON.stringify({ error: { message: "Not Found", type: "not_found_error", param: null, code: null } }));
        }
      });
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    mkdirSync(path.join(workspace, ".git"));
    writeFileSync(path.join(workspace, ".git", "config"), '[remote "origin"]\n\turl = git@github.com:Acme/App.git\n');
    mkdirSync(path.join(workspace, "src"));
  });

  after(() => {
    server.closeAllConnections();
    server.close();
    rmSync(workspace, { recursive: true, force: true });
  });

  test("complete, accept, edit: events and the ledger reach the server and the workspace", async () => {
    fake.settings["kaizen.serverUrl"] = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    fake.settings["kaizen.debounceMs"] = 0;
    fake.folders.push({ uri: Uri.file(workspace), name: path.basename(workspace), index: 0 });
    const document = new FakeDocument(Uri.file(path.join(workspace, "src", "calc.py")), PREFIX + SUFFIX);
    fake.documents.push(document);
    const context = fakeContext(new Map([["kaizen.apiToken", "kz_test"]]));
    await extension.activate(context as never);
    assert.equal(fake.providers.length, 1);
    assert.match(fake.statusItem.text, /Kaizen/);
    assert.equal(fake.statusItem.command, "kaizen.toggle");

    // The provider asks the server and shows the cleaned-up completion.
    const position = document.positionAt(PREFIX.length);
    const cancel = { isCancellationRequested: false, onCancellationRequested: () => ({ dispose: () => undefined }) };
    const items = (await fake.providers[0].provideInlineCompletionItems(document, position, { triggerKind: 1, selectedCompletionInfo: undefined }, cancel)) as InlineCompletionItem[];
    assert.equal(items.length, 1);
    assert.equal(items[0].insertText, "result = a + b");
    const request = received.find((r) => r.url === "/v1/completions")!;
    assert.equal(request.auth, "Bearer kz_test");
    assert.equal(request.body.prompt, PREFIX);
    assert.equal(request.body.suffix, SUFFIX);
    assert.equal(request.body.stream, true);
    assert.deepEqual(request.body.context, { language: "python", file_path: "src/calc.py", repository: "github.com/acme/app" });

    // The user accepts: VS Code inserts the text, then runs the item's command.
    const offset = PREFIX.length;
    fake.edit(document, offset, 0, items[0].insertText);
    fake.window.activeTextEditor = { document, selection: { active: document.positionAt(offset + items[0].insertText.length) } };
    const command = items[0].command!;
    await fake.commands.get(command.command)!(...(command.arguments ?? []));
    await settle();

    // Then edits inside the region ("+" becomes "-") and types before it.
    fake.edit(document, offset + "result = a ".length, 1, "-");
    fake.edit(document, 0, 0, "# calc\n");
    await settle();

    await extension.deactivate();

    const events = received.filter((r) => r.url === "/v1/events").flatMap((r) => r.body.events);
    assert.deepEqual(
      events.map((e: { type: string }) => e.type),
      ["shown", "accepted", "edited"],
    );
    assert.ok(events.every((e: { completion_id: string }) => e.completion_id === "cmpl-e2e"));
    assert.equal(events[2].text, "result = a - b");

    const expected = {
      completion_id: "cmpl-e2e",
      choice_index: 0,
      repository: "github.com/acme/app",
      file_path: "src/calc.py",
      inserted_text: "result = a + b",
      current_text: "result = a - b",
      start_offset: offset + "# calc\n".length,
      state: "active",
    };
    const pushed = received.filter((r) => r.url === "/v1/ledger" && r.method === "PUT").flatMap((r) => r.body.entries);
    assert.ok(pushed.length >= 1);
    const { updated_at, ...last } = pushed[pushed.length - 1];
    assert.deepEqual(last, expected);
    assert.match(updated_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);

    const lines = readFileSync(path.join(workspace, ".kaizen", "ledger.jsonl"), "utf8").trim().split("\n");
    const { updated_at: _written, ...fromFile } = JSON.parse(lines[lines.length - 1]);
    assert.deepEqual(fromFile, expected);
    assert.equal(document.text.slice(expected.start_offset, expected.start_offset + expected.current_text.length), "result = a - b");
  });

  test("without a token: no request, the status bar asks for one, the command stores it", async () => {
    const before = received.length;
    const secrets = new Map<string, string>();
    const context = fakeContext(secrets);
    fake.providers.length = 0;
    fake.messages.length = 0;
    await extension.activate(context as never);
    assert.equal(fake.statusItem.command, "kaizen.setToken");
    assert.ok(fake.messages.some((m) => /API token/.test(m)));
    const document = fake.documents[0];
    const cancel = { isCancellationRequested: false, onCancellationRequested: () => ({ dispose: () => undefined }) };
    assert.equal(await fake.providers[0].provideInlineCompletionItems(document, new Position(1, 4), { triggerKind: 1, selectedCompletionInfo: undefined }, cancel), undefined);
    assert.equal(received.length, before);
    fake.inputBoxAnswer = "  kz_new  ";
    await fake.commands.get("kaizen.setToken")!();
    assert.equal(secrets.get("kaizen.apiToken"), "kz_new");
    assert.equal(fake.statusItem.command, "kaizen.toggle");
    await fake.commands.get("kaizen.toggle")!();
    assert.equal(fake.settings["kaizen.enabled"], false);
    assert.match(fake.statusItem.text, /circle-slash/);
    await extension.deactivate();
  });
});
