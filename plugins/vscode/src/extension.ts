// The only module that touches the VS Code API: it adapts documents, settings, secrets, commands
// and the status bar to the logic in controller.ts, events.ts, ledger*.ts and repository.ts.

import * as path from "node:path";
import * as vscode from "vscode";
import { KaizenClient, KaizenError } from "./client";
import { CompletionController, DocumentSnapshot, KeptRegion, readSettings, Settings, Status } from "./controller";
import { EditReporter, EventBatcher } from "./events";
import { locateInserted, TextChange } from "./ledger";
import { RepositoryLedger } from "./ledgerStore";
import { RepositoryInfo, RepositoryResolver, relativePath } from "./repository";

const TOKEN_KEY = "kaizen.apiToken";
const ACCEPT_COMMAND = "kaizen.accepted";

interface DocInfo extends RepositoryInfo {
  /** Relative to `root`, `/` separators. */
  filePath: string;
  /** Whether the ledger follows this document (a file inside its repository). */
  tracked: boolean;
}

interface AcceptArgs {
  completionId: string;
  choiceIndex: number;
  fullText: string;
  insertText: string;
  documentKey: string;
  shownOffset: number;
}

let deactivateHook: (() => Promise<void>) | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const log = vscode.window.createOutputChannel("Kaizen");
  const settings = (): Settings => {
    const config = vscode.workspace.getConfiguration("kaizen");
    return readSettings((name) => config.get(name));
  };
  let token = (await context.secrets.get(TOKEN_KEY)) || undefined;
  const version = String((context.extension?.packageJSON as { version?: unknown } | undefined)?.version ?? "0");
  const client = (): KaizenClient | undefined =>
    token ? new KaizenClient({ baseUrl: settings().serverUrl, token, userAgent: `kaizen-vscode/${version}` }) : undefined;
  const requireClient = (): KaizenClient => {
    const c = client();
    if (!c) {
      throw new KaizenError("no API token set", { kind: "auth" });
    }
    return c;
  };
  const warn = (message: string) => log.appendLine(`${new Date().toISOString()} ${message}`);

  // Status bar: state at a glance; a click toggles completions (or asks for the missing token).
  const statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  context.subscriptions.push(statusItem, log);
  let lastStatus: Status = { state: token ? "ready" : "no-token" };
  const showStatus = (status: Status = lastStatus) => {
    lastStatus = status;
    const enabled = settings().enabled;
    const state = !enabled ? "disabled" : !token ? "no-token" : status.state;
    const look: Record<Status["state"], [string, string]> = {
      ready: ["$(sparkle) Kaizen", "ready"],
      requesting: ["$(loading~spin) Kaizen", "asking for a completion"],
      error: ["$(warning) Kaizen", "error"],
      "no-token": ["$(key) Kaizen", "no API token"],
      disabled: ["$(circle-slash) Kaizen", "off"],
    };
    const [text, words] = look[state];
    statusItem.text = text;
    const detail = state === status.state && status.detail ? `: ${status.detail}` : "";
    statusItem.tooltip = `Kaizen ${words}${detail}\n${settings().serverUrl}\nClick to ${state === "no-token" ? "set the API token" : enabled ? "turn completions off" : "turn completions on"}.`;
    statusItem.command = state === "no-token" ? "kaizen.setToken" : "kaizen.toggle";
    statusItem.backgroundColor = state === "error" ? new vscode.ThemeColor("statusBarItem.warningBackground") : undefined;
    statusItem.show();
  };
  showStatus();

  // Events, batched and retried.
  const events = new EventBatcher(
    async (batch) => {
      const answer = await requireClient().postEvents(batch);
      return { unknownCompletionIds: answer.unknown_completion_ids };
    },
    { onWarning: warn },
  );
  const edits = new EditReporter((completionId, choiceIndex, text) =>
    events.add({ completion_id: completionId, choice_index: choiceIndex, type: "edited", text }),
  );

  // Repositories and their ledgers.
  const resolver = new RepositoryResolver();
  const infos = new Map<string, DocInfo>();
  const ledgers = new Map<string, Promise<RepositoryLedger>>();
  const loadedLedgers = new Map<string, RepositoryLedger>();
  const ledgerFor = (info: RepositoryInfo): Promise<RepositoryLedger> => {
    let found = ledgers.get(info.root);
    if (!found) {
      const store = new RepositoryLedger({
        root: info.root,
        repository: info.repository,
        put: async (entries) => {
          const answer = await requireClient().putLedger(entries);
          return { unknownCompletionIds: answer.unknown_completion_ids };
        },
        onWarning: warn,
      });
      found = store
        .load()
        .catch((err) => warn(`Kaizen: could not read the ledger of ${info.root}: ${(err as Error).message}`))
        .then(() => {
          loadedLedgers.set(info.root, store);
          return store;
        });
      ledgers.set(info.root, found);
    }
    return found;
  };
  const infoFor = async (document: vscode.TextDocument): Promise<DocInfo> => {
    const key = document.uri.toString();
    const cached = infos.get(key);
    if (cached) {
      return cached;
    }
    let info: DocInfo;
    const folder = vscode.workspace.getWorkspaceFolder(document.uri) ?? vscode.workspace.workspaceFolders?.[0];
    if (document.uri.scheme === "file") {
      const file = document.uri.fsPath;
      const repo = await resolver.resolve(path.dirname(file), folder?.uri.scheme === "file" ? folder.uri.fsPath : undefined);
      const relative = relativePath(repo.root, file);
      info = { ...repo, filePath: relative ?? path.basename(file), tracked: relative !== undefined };
    } else {
      const repo =
        folder?.uri.scheme === "file"
          ? await resolver.resolve(folder.uri.fsPath)
          : { root: "", repository: "local/untitled", git: false };
      info = { ...repo, filePath: path.posix.basename(document.uri.path) || "untitled", tracked: false };
    }
    infos.set(key, info);
    if (info.tracked) {
      await ledgerFor(info);
    }
    return info;
  };

  const findDocument = (key: string) => vscode.workspace.textDocuments.find((d) => d.uri.toString() === key);

  /** Record an accepted (or partly kept) completion in its repository's ledger. */
  const recordInLedger = async (document: vscode.TextDocument, completionId: string, choiceIndex: number, text: string, offset: number) => {
    const info = await infoFor(document);
    if (!info.tracked || !text) {
      return;
    }
    const store = await ledgerFor(info);
    store.ledger.accept({ completion_id: completionId, choice_index: choiceIndex, repository: info.repository, file_path: info.filePath, text, start_offset: offset });
    edits.baseline(completionId, choiceIndex, text);
    store.changed();
  };

  const errorsShown = new Set<string>();
  const controller = new CompletionController({
    settings,
    client,
    events,
    documentText: (key) => findDocument(key)?.getText(),
    onStatus: (status) => showStatus(status),
    onError: (error) => {
      warn(`Kaizen: completion failed: ${error.message}`);
      if (error.kind === "auth" && !errorsShown.has(`auth:${token}`)) {
        errorsShown.add(`auth:${token}`);
        void vscode.window.showWarningMessage(`Kaizen: ${error.message}`, "Set API Token").then((choice) => {
          if (choice) {
            void vscode.commands.executeCommand("kaizen.setToken");
          }
        });
      }
    },
    onKept: (kept: KeptRegion) => {
      const document = findDocument(kept.documentKey);
      if (document) {
        void recordInLedger(document, kept.completionId, kept.choiceIndex, kept.text, kept.offset);
      }
    },
  });

  const provider: vscode.InlineCompletionItemProvider = {
    async provideInlineCompletionItems(document, position, inlineContext, cancel) {
      if (inlineContext.selectedCompletionInfo) {
        return undefined; // the suggest widget has a selection: leave it alone
      }
      const abort = new AbortController();
      const subscription = cancel.onCancellationRequested(() => abort.abort());
      if (cancel.isCancellationRequested) {
        abort.abort();
      }
      try {
        const info = await infoFor(document);
        const snapshot: DocumentSnapshot = {
          key: document.uri.toString(),
          text: document.getText(),
          offset: document.offsetAt(position),
          languageId: document.languageId,
          filePath: info.filePath,
          repository: info.repository,
        };
        const suggestion = await controller.provide(snapshot, abort.signal);
        if (!suggestion || cancel.isCancellationRequested) {
          return undefined;
        }
        const args: AcceptArgs = {
          completionId: suggestion.completionId,
          choiceIndex: suggestion.choiceIndex,
          fullText: suggestion.fullText,
          insertText: suggestion.insertText,
          documentKey: snapshot.key,
          shownOffset: suggestion.shownOffset,
        };
        const item = new vscode.InlineCompletionItem(suggestion.insertText, new vscode.Range(position, position), {
          title: "Kaizen: completion accepted",
          command: ACCEPT_COMMAND,
          arguments: [args],
        });
        return [item];
      } catch (err) {
        warn(`Kaizen: ${(err as Error).message}`);
        return undefined;
      } finally {
        subscription.dispose();
      }
    },
  };
  // Partial acceptance (word by word), where this VS Code reports it: (item, length) in older
  // versions, (item, length, info) or (item, { acceptedLength }) in newer ones.
  Object.assign(provider, {
    handleDidPartiallyAcceptCompletionItem(item: vscode.InlineCompletionItem, accepted: number | { acceptedLength?: number }) {
      const args = item.command?.arguments?.[0] as AcceptArgs | undefined;
      const length = typeof accepted === "number" ? accepted : accepted?.acceptedLength;
      if (args?.completionId && typeof length === "number" && length > 0) {
        const typedBefore = args.fullText.length - args.insertText.length;
        controller.partiallyAccepted(args.completionId, args.choiceIndex, typedBefore + length);
      }
    },
  });

  const onAccepted = async (args: AcceptArgs) => {
    if (!args?.completionId) {
      return;
    }
    controller.accepted(args.completionId, args.choiceIndex);
    const document = findDocument(args.documentKey);
    if (!document) {
      return;
    }
    const editor = vscode.window.activeTextEditor;
    const cursor = editor && editor.document === document ? document.offsetAt(editor.selection.active) : -1;
    const located = locateInserted(document.getText(), cursor, [args.fullText, args.insertText], args.shownOffset);
    if (located) {
      await recordInLedger(document, args.completionId, args.choiceIndex, located.text, located.start);
    } else {
      warn(`Kaizen: accepted ${args.completionId} but could not find its text in ${document.uri.fsPath}`);
    }
  };

  const applyChanges = (info: DocInfo, changes: TextChange[]) => {
    const store = loadedLedgers.get(info.root);
    if (!store) {
      return;
    }
    const touched = store.ledger.applyChanges(info.filePath, changes);
    if (!touched.length) {
      return;
    }
    store.changed();
    for (const { entry, effect } of touched) {
      if (effect === "edited" || effect === "removed") {
        edits.changed(entry.completion_id, entry.choice_index, entry.current_text);
      }
    }
  };

  // Changes of one document are applied in order, also while its repository is being looked up.
  const chains = new Map<string, Promise<void>>();
  const onDocumentChange = (event: vscode.TextDocumentChangeEvent) => {
    const document = event.document;
    if (document.uri.scheme !== "file" || !event.contentChanges.length) {
      return;
    }
    const changes: TextChange[] = event.contentChanges.map((c) => ({ offset: c.rangeOffset, length: c.rangeLength, text: c.text }));
    const key = document.uri.toString();
    const info = infos.get(key);
    if (info && !chains.has(key) && (!info.tracked || loadedLedgers.has(info.root))) {
      if (info.tracked) {
        applyChanges(info, changes);
      }
      return;
    }
    const next = (chains.get(key) ?? Promise.resolve())
      .then(() => infoFor(document))
      .then((resolved) => {
        if (resolved.tracked) {
          applyChanges(resolved, changes);
        }
      })
      .catch((err) => warn(`Kaizen: ledger update failed: ${(err as Error).message}`));
    chains.set(key, next);
    void next.then(() => {
      if (chains.get(key) === next) {
        chains.delete(key);
      }
    });
  };

  // A document opened after changes made outside the editor: move entries to where their text is.
  const onDocumentOpen = async (document: vscode.TextDocument) => {
    if (document.uri.scheme !== "file") {
      return;
    }
    const info = await infoFor(document);
    if (!info.tracked) {
      return;
    }
    const store = await ledgerFor(info);
    if (store.ledger.reconcile(info.filePath, document.getText()).length) {
      store.changed();
    }
  };

  const onRename = async (event: vscode.FileRenameEvent) => {
    for (const { oldUri, newUri } of event.files) {
      if (oldUri.scheme !== "file" || newUri.scheme !== "file") {
        continue;
      }
      const repo = await resolver.resolve(path.dirname(oldUri.fsPath));
      const store = loadedLedgers.get(repo.root);
      const from = relativePath(repo.root, oldUri.fsPath);
      const to = relativePath(repo.root, newUri.fsPath);
      if (store && from && to && store.ledger.renameFile(from, to)) {
        store.changed();
      }
      for (const key of [...infos.keys()]) {
        if (key.startsWith(oldUri.toString())) {
          infos.delete(key);
        }
      }
    }
  };

  const setToken = async () => {
    const value = await vscode.window.showInputBox({
      title: "Kaizen: Set API Token",
      prompt: "A token with the ide role (`kaizen tokens create --role ide --name <you>` on the server)",
      placeHolder: "kz_...",
      password: true,
      ignoreFocusOut: true,
    });
    if (value === undefined) {
      return;
    }
    const trimmed = value.trim();
    if (trimmed) {
      await context.secrets.store(TOKEN_KEY, trimmed);
    } else {
      await context.secrets.delete(TOKEN_KEY);
    }
    token = trimmed || undefined;
    showStatus({ state: token ? "ready" : "no-token" });
    if (token) {
      void events.flush();
      for (const store of loadedLedgers.values()) {
        void store.push();
      }
    }
  };

  const toggle = async () => {
    const config = vscode.workspace.getConfiguration("kaizen");
    const inspected = config.inspect<boolean>("enabled");
    const target =
      inspected?.workspaceFolderValue !== undefined
        ? vscode.ConfigurationTarget.WorkspaceFolder
        : inspected?.workspaceValue !== undefined
          ? vscode.ConfigurationTarget.Workspace
          : vscode.ConfigurationTarget.Global;
    await config.update("enabled", !settings().enabled, target);
    showStatus({ state: "ready" });
  };

  context.subscriptions.push(
    vscode.languages.registerInlineCompletionItemProvider({ pattern: "**" }, provider),
    vscode.commands.registerCommand(ACCEPT_COMMAND, onAccepted),
    vscode.commands.registerCommand("kaizen.setToken", setToken),
    vscode.commands.registerCommand("kaizen.toggle", toggle),
    vscode.workspace.onDidChangeTextDocument(onDocumentChange),
    vscode.workspace.onDidOpenTextDocument((d) => void onDocumentOpen(d).catch((err) => warn(`Kaizen: ${(err as Error).message}`))),
    vscode.workspace.onDidCloseTextDocument((d) => infos.delete(d.uri.toString())),
    vscode.workspace.onDidRenameFiles((e) => void onRename(e).catch((err) => warn(`Kaizen: ${(err as Error).message}`))),
    vscode.workspace.onDidChangeWorkspaceFolders(() => {
      resolver.clear();
      infos.clear();
    }),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration("kaizen")) {
        showStatus();
      }
    }),
    context.secrets.onDidChange(async (e) => {
      if (e.key === TOKEN_KEY) {
        token = (await context.secrets.get(TOKEN_KEY)) || undefined;
        showStatus({ state: token ? "ready" : "no-token" });
      }
    }),
  );

  // Documents already open (the extension starts after the window): follow their ledgers.
  for (const document of vscode.workspace.textDocuments) {
    void onDocumentOpen(document).catch((err) => warn(`Kaizen: ${(err as Error).message}`));
  }

  deactivateHook = async () => {
    controller.dispose();
    edits.flushAll();
    edits.dispose();
    const stores = [...loadedLedgers.values()];
    await Promise.race([
      Promise.allSettled([events.flush(), ...stores.map((s) => s.flush())]),
      new Promise((resolve) => setTimeout(resolve, 3_000)),
    ]);
    events.dispose();
    stores.forEach((s) => s.dispose());
  };

  if (!token) {
    void vscode.window
      .showInformationMessage("Kaizen needs an API token (role ide) to complete code.", "Set API Token")
      .then((choice) => {
        if (choice) {
          void setToken();
        }
      });
  }
}

export async function deactivate(): Promise<void> {
  const hook = deactivateHook;
  deactivateHook = undefined;
  await hook?.();
}
