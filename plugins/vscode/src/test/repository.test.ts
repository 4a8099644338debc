import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { after, describe, test } from "node:test";
import { findRepository, normaliseRemote, originFromGitConfig, relativePath, repositoryId, RepositoryResolver } from "../repository";

// plugins/PROTOCOL.md, "Identifiers": the cases every client implementation is tested against
// (tests/plugins/test_repository.py holds the same for the Python one).
const PROTOCOL_CASES: [string, string][] = [
  ["git@github.com:Acme/App.git", "github.com/acme/app"],
  ["https://github.com/acme/app", "github.com/acme/app"],
  ["https://user:tok@GitLab.example.com/group/sub/proj.git", "gitlab.example.com/group/sub/proj"],
  ["ssh://git@host:2222/x/y", "host/x/y"],
  ["https://github.com/acme/app/", "github.com/acme/app"],
];

const MORE_CASES: [string, string][] = [
  ["http://github.com/Acme/App.git/", "github.com/acme/app"],
  ["https://github.com:443/acme/app", "github.com/acme/app"],
  ["git://git.example.org/pub/tool.git", "git.example.org/pub/tool"],
  ["github.com:acme/app.git", "github.com/acme/app"],
  ["  git@github.com:acme/app.git\n", "github.com/acme/app"],
  ["ssh://git@github.com/acme//app.git", "github.com/acme/app"],
  ["file:///srv/git/App.git", "srv/git/app"],
  ["/srv/git/app.git", "srv/git/app"],
  ["https://dev.azure.com/org/My%20Project/_git/repo", "dev.azure.com/org/my project/_git/repo"],
  ["ssh://git@[::1]:22/x/y.git", "::1/x/y"],
];

describe("normaliseRemote", () => {
  for (const [url, expected] of PROTOCOL_CASES) {
    test(`protocol case ${url}`, () => assert.equal(normaliseRemote(url), expected));
  }
  for (const [url, expected] of MORE_CASES) {
    test(`more: ${JSON.stringify(url)}`, () => assert.equal(normaliseRemote(url), expected));
  }
  test("an empty URL is refused", () => assert.throws(() => normaliseRemote("  "), /empty/));
});

describe("repositoryId", () => {
  test("the origin, normalised", () => assert.equal(repositoryId("git@github.com:Acme/App.git", "App"), "github.com/acme/app"));
  test("without a remote: local/<directory name>, case kept", () => {
    assert.equal(repositoryId(undefined, "My-Project"), "local/My-Project");
    assert.equal(repositoryId("   ", "My-Project"), "local/My-Project");
  });
});

describe("originFromGitConfig", () => {
  test("reads the url of [remote \"origin\"], not of other remotes", () => {
    const config = [
      "[core]",
      "\trepositoryformatversion = 0",
      '[remote "upstream"]',
      "\turl = git@github.com:other/app.git",
      '[remote "origin"]',
      "\tfetch = +refs/heads/*:refs/remotes/origin/*",
      "\turl = git@github.com:Acme/App.git",
      '[branch "main"]',
      "\tremote = origin",
    ].join("\n");
    assert.equal(originFromGitConfig(config), "git@github.com:Acme/App.git");
  });
  test("quotes, comments, CRLF, case of section and key", () => {
    const config = '[Remote "origin"]\r\n\tURL = "https://github.com/acme/app" # the main one\r\n';
    assert.equal(originFromGitConfig(config), "https://github.com/acme/app");
  });
  test("the old [remote.origin] spelling", () => {
    assert.equal(originFromGitConfig("[remote.origin]\n url = ssh://git@host:2222/x/y\n"), "ssh://git@host:2222/x/y");
  });
  test("no origin", () => {
    assert.equal(originFromGitConfig('[remote "fork"]\n\turl = x:y\n[remote "origin2"]\n\turl = a:b\n'), undefined);
    assert.equal(originFromGitConfig(""), undefined);
  });
});

describe("findRepository", () => {
  const base = mkdtempSync(path.join(tmpdir(), "kaizen-repo-"));
  after(() => rmSync(base, { recursive: true, force: true }));

  test("the nearest .git above a file's directory, with its origin", async () => {
    const root = path.join(base, "app");
    mkdirSync(path.join(root, ".git"), { recursive: true });
    mkdirSync(path.join(root, "src", "pkg"), { recursive: true });
    writeFileSync(path.join(root, ".git", "config"), '[remote "origin"]\n\turl = git@github.com:Acme/App.git\n');
    const info = await findRepository(path.join(root, "src", "pkg"));
    assert.deepEqual(info, { root, repository: "github.com/acme/app", git: true });
    assert.equal(relativePath(info.root, path.join(root, "src", "pkg", "util.py")), "src/pkg/util.py");
    assert.equal(relativePath(info.root, path.join(base, "elsewhere.py")), undefined);
  });

  test("a git repository without origin is local/<directory name>", async () => {
    const root = path.join(base, "My-Project");
    mkdirSync(path.join(root, ".git"), { recursive: true });
    writeFileSync(path.join(root, ".git", "config"), "[core]\n\tbare = false\n");
    assert.deepEqual(await findRepository(root), { root, repository: "local/My-Project", git: true });
  });

  test("a linked work tree reads its main repository's config", async () => {
    const main = path.join(base, "main");
    const gitDir = path.join(main, ".git", "worktrees", "feature");
    mkdirSync(gitDir, { recursive: true });
    writeFileSync(path.join(main, ".git", "config"), '[remote "origin"]\n\turl = https://gitlab.example.com/group/proj.git\n');
    writeFileSync(path.join(gitDir, "commondir"), "../..\n");
    const tree = path.join(base, "feature");
    mkdirSync(tree);
    writeFileSync(path.join(tree, ".git"), `gitdir: ${gitDir}\n`);
    assert.deepEqual(await findRepository(tree), { root: tree, repository: "gitlab.example.com/group/proj", git: true });
  });

  test("outside git: the fallback folder, local/<its name>", async () => {
    // A directory tree of its own under / would be ideal; the temporary directory has no .git
    // above it on the machines this runs on, which the test checks first.
    const plain = path.join(base, "Plain Folder");
    mkdirSync(path.join(plain, "sub"), { recursive: true });
    const info = await findRepository(path.join(plain, "sub"), plain);
    if (info.git) {
      return; // the temporary directory lies inside a git work tree: nothing to check here
    }
    assert.deepEqual(info, { root: plain, repository: "local/Plain Folder", git: false });
  });

  test("the resolver caches per directory", async () => {
    let calls = 0;
    const resolver = new RepositoryResolver(async (dir) => {
      calls += 1;
      return { root: dir, repository: "r", git: true };
    });
    await resolver.resolve("/a");
    await resolver.resolve("/a");
    await resolver.resolve("/b");
    assert.equal(calls, 2);
    resolver.clear();
    await resolver.resolve("/a");
    assert.equal(calls, 3);
  });
});
