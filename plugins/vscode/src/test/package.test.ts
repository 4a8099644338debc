import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import * as path from "node:path";
import { describe, test } from "node:test";
import { DEFAULT_SETTINGS } from "../controller";

// Compiled to out/test/: the package is two levels up.
const root = path.resolve(__dirname, "..", "..");
const manifest = JSON.parse(readFileSync(path.join(root, "package.json"), "utf8"));

describe("package.json", () => {
  test("identity, engine, activation, entry point", () => {
    assert.equal(manifest.name, "kaizen-vscode");
    assert.equal(manifest.publisher, "kaizen");
    assert.equal(manifest.engines.vscode, "^1.85.0");
    assert.deepEqual(manifest.activationEvents, ["onStartupFinished"]);
    assert.equal(manifest.main, "./out/extension.js");
    assert.ok(existsSync(path.join(root, manifest.main)), "the entry point is compiled");
  });

  test("the settings it declares are the ones the code reads, with the same defaults", () => {
    const properties = manifest.contributes.configuration.properties as Record<string, { default: unknown }>;
    const declared = Object.fromEntries(Object.entries(properties).map(([key, value]) => [key.replace(/^kaizen\./, ""), value.default]));
    assert.deepEqual(declared, { ...DEFAULT_SETTINGS });
  });

  test("the commands", () => {
    const commands = Object.fromEntries((manifest.contributes.commands as { command: string; title: string }[]).map((c) => [c.command, c.title]));
    assert.equal(commands["kaizen.setToken"], "Kaizen: Set API Token");
    assert.ok(commands["kaizen.toggle"]);
  });
});

describe("only extension.ts touches the VS Code API", () => {
  const sources = path.join(root, "src");
  for (const file of readdirSync(sources).filter((f) => f.endsWith(".ts") && f !== "extension.ts")) {
    test(file, () => {
      const text = readFileSync(path.join(sources, file), "utf8");
      assert.doesNotMatch(text, /from\s+["']vscode["']|require\(\s*["']vscode["']\s*\)/);
    });
  }
});
