// Wires the pure modules to VS Code: inline completions, events, the ledger, the status bar.

import * as fs from "node:fs/promises";
import * as path from "node:path";
import * as vscode from "vscode";
import { KaizenClient, KaizenError } from "./client";
import { EventBatcher, KaizenEvent } from "./events";
import { Ledger } from "./ledger";
import { postprocess } from "./postprocess";
import { originFromGitConfig, repositoryId } from "./repository";
import { buildBody, CompletionSettings, SseParser } from "./request";

const TOKEN_KEY = "kaizen.token";
const FLUSH_MS = 5_000;
const EDIT_QUIET_MS = 2_000;

interface Shown {
  id: string;
  accepted: boolean;
}

let status: vscode.StatusBarItem;

function settings(): CompletionSettings & { enabled: boolean; serverUrl: string; debounceMs: number } {
  const c = vscode.workspace.getConfiguration("kaizen");
  return {
    enabled: c.get("enabled", true),
    serverUrl: c.get("serverUrl", "http://127.0.0.1:8000"),
    model: c.get("model", "qwen2.5-coder-0.5b-instruct"),
    maxTokens: c.get("maxTokens", 64),
    debounceMs: c.get("debounceMs", 150),
    prefixChars: c.get("prefixChars", 3000),
    suffixChars: c.get("suffixChars", 1000),
    singleLine: c.get("singleLine", false),
  };
}

function setStatus(state: "ready" | "requesting" | "error" | "no token" | "off", detail = ""): void {
  const icons = { ready: "$(check)", requesting: "$(sync~spin)", error: "$(error)", "no token": "$(key)", off: "$(circle-slash)" };
  status.text = `${icons[state]} Kaizen`;
  status.tooltip = `Kaizen: ${state}${detail ? ` (${detail})` : ""}. Click to toggle.`;
}

async function workspaceRepository(folder: vscode.WorkspaceFolder): Promise<string> {
  let origin: string | undefined;
  try {
    origin = originFromGitConfig(await fs.readFile(path.join(folder.uri.fsPath, ".git", "config"), "utf8"));
  } catch {
    origin = undefined; // not a git checkout
  }
  return repositoryId(origin, folder.name);
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  status.command = "kaizen.toggle";
  status.show();
  context.subscriptions.push(status);

  let token = await context.secrets.get(TOKEN_KEY);
  setStatus(token ? "ready" : "no token");
  const client = () => new KaizenClient(settings().serverUrl, token ?? "");

  const folder = vscode.workspace.workspaceFolders?.[0];
  const repository = folder ? await workspaceRepository(folder) : "local/untitled";
  const ledgerPath = folder ? path.join(folder.uri.fsPath, ".kaizen", "ledger.jsonl") : undefined;
  let ledger = new Ledger();
  if (ledgerPath) {
    try {
      ledger = Ledger.parse(await fs.readFile(ledgerPath, "utf8"));
    } catch {
      // no ledger yet
    }
  }

  const events = new EventBatcher(async (batch: KaizenEvent[]) => {
    await client().postJson("POST", "/v1/events", { events: batch });
  });

  async function flush(): Promise<void> {
    if (!token) {
      return;
    }
    await events.flush();
    const pending = ledger.pendingPush();
    if (pending.length) {
      if (ledgerPath) {
        await fs.mkdir(path.dirname(ledgerPath), { recursive: true });
        await fs.writeFile(ledgerPath, ledger.serialise());
      }
      try {
        await client().postJson("PUT", "/v1/ledger", { entries: pending });
        ledger.markPushed(pending);
      } catch {
        // kept dirty: pushed on the next flush
      }
    }
  }
  const timer = setInterval(() => void flush(), FLUSH_MS);
  context.subscriptions.push({ dispose: () => clearInterval(timer) });

  let lastShown: Shown | undefined;
  function rejectLastShown(): void {
    if (lastShown && !lastShown.accepted) {
      events.add(lastShown.id, "rejected");
    }
    lastShown = undefined;
  }

  const provider: vscode.InlineCompletionItemProvider = {
    async provideInlineCompletionItems(document, position, _ctx, cancel) {
      const s = settings();
      if (!s.enabled || !token) {
        return [];
      }
      rejectLastShown();
      await new Promise((resolve) => setTimeout(resolve, s.debounceMs));
      if (cancel.isCancellationRequested) {
        return [];
      }
      const abort = new AbortController();
      const subscription = cancel.onCancellationRequested(() => abort.abort());
      const relative = folder ? path.relative(folder.uri.fsPath, document.uri.fsPath).split(path.sep).join("/") : document.uri.path;
      const text = document.getText();
      const offset = document.offsetAt(position);
      const body = buildBody(text, offset, s, { language: document.languageId, filePath: relative, repository });
      setStatus("requesting");
      try {
        const response = await client().request("POST", "/v1/completions", body, abort.signal);
        const parser = new SseParser();
        const decoder = new TextDecoder();
        for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
          parser.push(decoder.decode(chunk, { stream: true }));
        }
        setStatus("ready");
        if (parser.state.error) {
          throw new KaizenError(parser.state.error);
        }
        const completion = postprocess(parser.state.text, body.suffix, s.singleLine);
        const id = parser.state.id;
        if (!completion || !id || cancel.isCancellationRequested) {
          return [];
        }
        events.add(id, "shown");
        lastShown = { id, accepted: false };
        const item = new vscode.InlineCompletionItem(completion, new vscode.Range(position, position));
        item.command = {
          command: "kaizen.accepted",
          title: "Kaizen: completion accepted",
          arguments: [id, relative, offset, completion],
        };
        return [item];
      } catch (err) {
        if (!abort.signal.aborted) {
          setStatus("error", (err as Error).message);
        }
        return [];
      } finally {
        subscription.dispose();
      }
    },
  };
  // Partial acceptance (word by word) where this VS Code version reports it.
  (provider as { handleDidPartiallyAcceptCompletionItem?: unknown }).handleDidPartiallyAcceptCompletionItem = (
    item: vscode.InlineCompletionItem,
    acceptedLength: number,
  ) => {
    const id = item.command?.arguments?.[0] as string | undefined;
    if (id) {
      events.add(id, "partially_accepted", { accepted_length: acceptedLength });
      if (lastShown?.id === id) {
        lastShown.accepted = true;
      }
    }
  };

  const editTimers = new Map<string, NodeJS.Timeout>();
  context.subscriptions.push(
    vscode.languages.registerInlineCompletionItemProvider({ pattern: "**" }, provider),
    vscode.commands.registerCommand("kaizen.accepted", (id: string, filePath: string, offset: number, text: string) => {
      if (lastShown?.id === id) {
        lastShown.accepted = true;
      }
      events.add(id, "accepted");
      ledger.accept({ completion_id: id, repository, file_path: filePath, inserted_text: text, start_offset: offset });
    }),
    vscode.commands.registerCommand("kaizen.setToken", async () => {
      const value = await vscode.window.showInputBox({ prompt: "Kaizen API token (role ide)", password: true, ignoreFocusOut: true });
      if (value) {
        token = value.trim();
        await context.secrets.store(TOKEN_KEY, token);
        setStatus("ready");
      }
    }),
    vscode.commands.registerCommand("kaizen.toggle", async () => {
      const c = vscode.workspace.getConfiguration("kaizen");
      const enabled = !c.get("enabled", true);
      await c.update("enabled", enabled, vscode.ConfigurationTarget.Global);
      setStatus(enabled ? (token ? "ready" : "no token") : "off");
    }),
    vscode.workspace.onDidChangeTextDocument((change) => {
      if (!folder || change.document.uri.scheme !== "file") {
        return;
      }
      const relative = path.relative(folder.uri.fsPath, change.document.uri.fsPath).split(path.sep).join("/");
      const documentText = change.document.getText();
      // VS Code reports the changes of one edit against the old text, last offset first.
      const ordered = [...change.contentChanges].sort((a, b) => b.rangeOffset - a.rangeOffset);
      for (const c of ordered) {
        for (const entry of ledger.applyChange(relative, { offset: c.rangeOffset, length: c.rangeLength, text: c.text }, documentText)) {
          // One `edited` event once the developer pauses, not one per keystroke.
          clearTimeout(editTimers.get(entry.completion_id));
          editTimers.set(
            entry.completion_id,
            setTimeout(() => {
              editTimers.delete(entry.completion_id);
              events.add(entry.completion_id, "edited", { text: entry.current_text });
            }, EDIT_QUIET_MS),
          );
        }
      }
    }),
    { dispose: () => void flush() },
  );
}

export function deactivate(): void {
  // Pending events are flushed by the disposable registered in activate().
}
