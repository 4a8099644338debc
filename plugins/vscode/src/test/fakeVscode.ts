// Just enough of the `vscode` module for extension.ts to run in plain Node: documents, settings,
// secrets, commands, events, the status bar. Tests install it before requiring the extension.

import Module from "node:module";

type Listener<T> = (event: T) => unknown;

export class Emitter<T> {
  private listeners: Listener<T>[] = [];
  readonly event = (listener: Listener<T>) => {
    this.listeners.push(listener);
    return { dispose: () => (this.listeners = this.listeners.filter((l) => l !== listener)) };
  };
  fire(event: T): void {
    for (const listener of [...this.listeners]) {
      listener(event);
    }
  }
}

export class Position {
  constructor(
    readonly line: number,
    readonly character: number,
  ) {}
}

export class Range {
  constructor(
    readonly start: Position,
    readonly end: Position,
  ) {}
}

export class InlineCompletionItem {
  constructor(
    public insertText: string,
    public range?: Range,
    public command?: { command: string; title: string; arguments?: unknown[] },
  ) {}
}

export class ThemeColor {
  constructor(readonly id: string) {}
}

export class Uri {
  readonly scheme: string;
  readonly path: string;
  readonly fsPath: string;
  private constructor(scheme: string, path: string) {
    this.scheme = scheme;
    this.path = path;
    this.fsPath = path;
  }
  static file(path: string): Uri {
    return new Uri("file", path);
  }
  static untitled(name: string): Uri {
    return new Uri("untitled", name);
  }
  toString(): string {
    return `${this.scheme}://${this.path}`;
  }
}

export class FakeDocument {
  version = 1;
  constructor(
    readonly uri: Uri,
    public text: string,
    readonly languageId = "python",
  ) {}
  get fileName(): string {
    return this.uri.fsPath;
  }
  getText(): string {
    return this.text;
  }
  offsetAt(position: Position): number {
    const lines = this.text.split("\n");
    let offset = 0;
    for (let i = 0; i < position.line && i < lines.length; i++) {
      offset += lines[i].length + 1;
    }
    return Math.min(this.text.length, offset + position.character);
  }
  positionAt(offset: number): Position {
    const before = this.text.slice(0, offset).split("\n");
    return new Position(before.length - 1, before[before.length - 1].length);
  }
}

export interface FakeVscode {
  module: Record<string, unknown>;
  settings: Record<string, unknown>;
  documents: FakeDocument[];
  folders: { uri: Uri; name: string; index: number }[];
  commands: Map<string, (...args: unknown[]) => unknown>;
  providers: { provideInlineCompletionItems: (...args: unknown[]) => Promise<InlineCompletionItem[] | undefined> }[];
  statusItem: { text: string; tooltip?: string; command?: string; visible: boolean };
  messages: string[];
  inputBoxAnswer: string | undefined;
  window: { activeTextEditor: { document: FakeDocument; selection: { active: Position } } | undefined };
  onDidChangeTextDocument: Emitter<unknown>;
  onDidOpenTextDocument: Emitter<unknown>;
  /** Edit a document as VS Code would, firing the change event. */
  edit(document: FakeDocument, offset: number, length: number, text: string): void;
}

export function createFakeVscode(): FakeVscode {
  const onDidChangeTextDocument = new Emitter<unknown>();
  const onDidOpenTextDocument = new Emitter<unknown>();
  const never = new Emitter<unknown>().event;
  const fake: FakeVscode = {
    module: {},
    settings: {},
    documents: [],
    folders: [],
    commands: new Map(),
    providers: [],
    statusItem: { text: "", visible: false },
    messages: [],
    inputBoxAnswer: undefined,
    window: { activeTextEditor: undefined },
    onDidChangeTextDocument,
    onDidOpenTextDocument,
    edit(document, offset, length, text) {
      const range = new Range(document.positionAt(offset), document.positionAt(offset + length));
      document.text = document.text.slice(0, offset) + text + document.text.slice(offset + length);
      document.version += 1;
      onDidChangeTextDocument.fire({ document, contentChanges: [{ range, rangeOffset: offset, rangeLength: length, text }], reason: undefined });
    },
  };
  const statusItem = fake.statusItem as FakeVscode["statusItem"] & Record<string, unknown>;
  Object.assign(statusItem, {
    show: () => (statusItem.visible = true),
    hide: () => (statusItem.visible = false),
    dispose: () => undefined,
  });
  const message = async (text: string) => {
    fake.messages.push(text);
    return undefined;
  };
  fake.module = {
    Position,
    Range,
    InlineCompletionItem,
    ThemeColor,
    Uri,
    StatusBarAlignment: { Left: 1, Right: 2 },
    ConfigurationTarget: { Global: 1, Workspace: 2, WorkspaceFolder: 3 },
    window: {
      get activeTextEditor() {
        return fake.window.activeTextEditor;
      },
      createOutputChannel: () => ({ appendLine: () => undefined, dispose: () => undefined }),
      createStatusBarItem: () => statusItem,
      showInformationMessage: message,
      showWarningMessage: message,
      showErrorMessage: message,
      showInputBox: async () => fake.inputBoxAnswer,
    },
    workspace: {
      get workspaceFolders() {
        return fake.folders;
      },
      get textDocuments() {
        return fake.documents;
      },
      getWorkspaceFolder: (uri: Uri) => fake.folders.find((f) => uri.fsPath.startsWith(f.uri.fsPath + "/")),
      getConfiguration: (section: string) => ({
        get: (name: string) => fake.settings[`${section}.${name}`],
        inspect: () => ({}),
        update: async (name: string, value: unknown) => {
          fake.settings[`${section}.${name}`] = value;
        },
      }),
      onDidChangeTextDocument: onDidChangeTextDocument.event,
      onDidOpenTextDocument: onDidOpenTextDocument.event,
      onDidCloseTextDocument: never,
      onDidRenameFiles: never,
      onDidChangeWorkspaceFolders: never,
      onDidChangeConfiguration: never,
    },
    languages: {
      registerInlineCompletionItemProvider: (_selector: unknown, provider: FakeVscode["providers"][number]) => {
        fake.providers.push(provider);
        return { dispose: () => undefined };
      },
    },
    commands: {
      registerCommand: (id: string, fn: (...args: unknown[]) => unknown) => {
        fake.commands.set(id, fn);
        return { dispose: () => fake.commands.delete(id) };
      },
      executeCommand: async (id: string, ...args: unknown[]) => fake.commands.get(id)?.(...args),
    },
  };
  return fake;
}

/** Make `require("vscode")` return `fake.module`. */
export function installFakeVscode(fake: FakeVscode): void {
  const loader = Module as unknown as { _load: (request: string, ...rest: unknown[]) => unknown };
  const original = loader._load;
  loader._load = function (request: string, ...rest: unknown[]) {
    return request === "vscode" ? fake.module : original.call(this, request, ...rest);
  };
}

export function fakeContext(secrets: Map<string, string>) {
  const changed = new Emitter<{ key: string }>();
  return {
    subscriptions: [] as { dispose(): unknown }[],
    extension: { packageJSON: { version: "0.1.0" } },
    secrets: {
      get: async (key: string) => secrets.get(key),
      store: async (key: string, value: string) => {
        secrets.set(key, value);
        changed.fire({ key });
      },
      delete: async (key: string) => {
        secrets.delete(key);
        changed.fire({ key });
      },
      onDidChange: changed.event,
    },
  };
}
