import assert from "node:assert/strict";
import { test } from "node:test";
import { normaliseRemote, originFromGitConfig, repositoryId } from "../src/repository";

test("remote URLs normalise as plugins/PROTOCOL.md says", () => {
  assert.equal(normaliseRemote("git@github.com:Acme/App.git"), "github.com/acme/app");
  assert.equal(normaliseRemote("https://user:tok@GitLab.example.com/group/sub/proj.git"), "gitlab.example.com/group/sub/proj");
  assert.equal(normaliseRemote("ssh://git@host:2222/x/y"), "host/x/y");
  assert.equal(normaliseRemote("https://github.com/acme/app/"), "github.com/acme/app");
});

test("no origin gives a local id", () => {
  assert.equal(repositoryId(undefined, "My-Project"), "local/My-Project");
  assert.equal(repositoryId("not a url", "p"), "local/p");
});

test("origin is read from .git/config", () => {
  const config = '[core]\n\tbare = false\n[remote "upstream"]\n\turl = https://x/y\n[remote "origin"]\n\turl = git@github.com:Acme/App.git\n\tfetch = +refs/heads/*\n';
  assert.equal(originFromGitConfig(config), "git@github.com:Acme/App.git");
  assert.equal(originFromGitConfig("[core]\n"), undefined);
});
