// Repository identity (plugins/PROTOCOL.md, "Identifiers"): the normalised URL of the `origin`
// remote (host and path, lower-case, no scheme, no user, no port, no `.git`), or
// `local/<directory name>` without one. The Python twin is plugins/common/kaizen_client/repository.py;
// both are tested against the same cases. No VS Code API here.

import { promises as fsp } from "node:fs";
import * as path from "node:path";

// scp-like syntax: [user@]host:path (git's rule: no slash before the first colon).
const SCP_LIKE = /^(?:[^@/]+@)?([^:/]+):(.*)$/s;

/** Normalise a git remote URL to `host/path`. Throws on an empty URL. */
export function normaliseRemote(url: string): string {
  const text = url.trim();
  if (!text) {
    throw new Error("empty remote URL");
  }
  let host: string;
  let repoPath: string;
  const schemeEnd = text.indexOf("://");
  if (schemeEnd !== -1) {
    const rest = text.slice(schemeEnd + 3);
    const slash = rest.search(/[/?#]/);
    const authority = slash === -1 ? rest : rest.slice(0, slash);
    repoPath = slash === -1 ? "" : rest.slice(slash).replace(/[?#].*$/s, "");
    host = authority.slice(authority.lastIndexOf("@") + 1); // no user, no password
    if (host.startsWith("[")) {
      const close = host.indexOf("]");
      host = close === -1 ? host.slice(1) : host.slice(1, close); // IPv6 literal
    } else {
      host = host.replace(/:\d*$/, ""); // no port
    }
    try {
      repoPath = decodeURIComponent(repoPath);
    } catch {
      // keep a path with a stray % as it is
    }
  } else {
    const match = SCP_LIKE.exec(text);
    // "C:\src\app" is a Windows path, not host "C".
    if (match && match[1].length > 1 && !text.startsWith(".") && !text.startsWith("/")) {
      host = match[1];
      repoPath = match[2];
    } else {
      host = "";
      repoPath = text; // a local path
    }
  }
  repoPath = repoPath.replace(/\\/g, "/").replace(/\/{2,}/g, "/").replace(/^\/+|\/+$/g, "");
  if (repoPath.toLowerCase().endsWith(".git")) {
    repoPath = repoPath.slice(0, -4).replace(/\/+$/, "");
  }
  const joined = host && repoPath ? `${host}/${repoPath}` : host || repoPath;
  return joined.toLowerCase();
}

/** The repository id: the normalised `origin` URL, else `local/<directory name>` (case kept). */
export function repositoryId(originUrl: string | undefined, directoryName: string): string {
  if (originUrl !== undefined) {
    try {
      const normalised = normaliseRemote(originUrl);
      if (normalised) {
        return normalised;
      }
    } catch {
      // an empty URL: fall back to the local id
    }
  }
  return `local/${directoryName}`;
}

/** The first `url` of `[remote "origin"]` in the text of a git config file. */
export function originFromGitConfig(config: string): string | undefined {
  let inOrigin = false;
  for (const raw of config.split(/\r?\n/)) {
    const line = raw.trim();
    if (!line || line.startsWith("#") || line.startsWith(";")) {
      continue;
    }
    if (line.startsWith("[")) {
      // Section names are case-insensitive, subsection names are not; [remote.origin] is the
      // old spelling of [remote "origin"].
      const header = /^\[\s*([A-Za-z0-9.-]+)(?:\s+"((?:[^"\\]|\\.)*)")?\s*\]/.exec(line);
      if (!header) {
        inOrigin = false;
        continue;
      }
      const section = header[1].toLowerCase();
      inOrigin = header[2] !== undefined ? section === "remote" && header[2] === "origin" : section === "remote.origin";
      continue;
    }
    if (!inOrigin) {
      continue;
    }
    const entry = /^([A-Za-z][A-Za-z0-9-]*)\s*=\s*(.*)$/.exec(line);
    if (entry && entry[1].toLowerCase() === "url") {
      const value = gitConfigValue(entry[2]);
      if (value) {
        return value;
      }
    }
  }
  return undefined;
}

/** A git config value: quotes removed, escapes resolved, trailing comment dropped. */
function gitConfigValue(raw: string): string {
  let out = "";
  let quoted = false;
  for (let i = 0; i < raw.length; i++) {
    const c = raw[i];
    if (c === '"') {
      quoted = !quoted;
    } else if (c === "\\" && i + 1 < raw.length) {
      const next = raw[++i];
      out += next === "n" ? "\n" : next === "t" ? "\t" : next;
    } else if ((c === "#" || c === ";") && !quoted) {
      break;
    } else {
      out += c;
    }
  }
  return out.trim();
}

export interface RepositoryInfo {
  /** The work tree's top directory (absolute), or the fallback directory outside git. */
  root: string;
  /** The protocol's repository id. */
  repository: string;
  /** Whether `root` is a git work tree. */
  git: boolean;
}

async function readText(file: string): Promise<string | undefined> {
  try {
    return await fsp.readFile(file, "utf8");
  } catch {
    return undefined;
  }
}

/** Where the config of the git directory `.git` at `dotGit` lives (work trees and submodules
 *  have a `.git` file pointing elsewhere; a linked work tree shares its main repository's config). */
async function gitConfigPath(dotGit: string): Promise<string | undefined> {
  let stat;
  try {
    stat = await fsp.stat(dotGit);
  } catch {
    return undefined;
  }
  let gitDir = dotGit;
  if (stat.isFile()) {
    const pointer = /^gitdir:\s*(.+?)\s*$/m.exec((await readText(dotGit)) ?? "");
    if (!pointer) {
      return undefined;
    }
    gitDir = path.resolve(path.dirname(dotGit), pointer[1]);
  } else if (!stat.isDirectory()) {
    return undefined;
  }
  const common = (await readText(path.join(gitDir, "commondir")))?.trim();
  return path.join(common ? path.resolve(gitDir, common) : gitDir, "config");
}

/**
 * The repository containing `directory`: the nearest ancestor (or itself) with a `.git`, its id
 * from `origin`. Outside git, `fallbackRoot` (a workspace folder; default `directory`) named
 * `local/<its name>`.
 */
export async function findRepository(directory: string, fallbackRoot?: string): Promise<RepositoryInfo> {
  let current = path.resolve(directory);
  for (;;) {
    const config = await gitConfigPath(path.join(current, ".git"));
    if (config !== undefined) {
      const origin = originFromGitConfig((await readText(config)) ?? "");
      return { root: current, repository: repositoryId(origin, path.basename(current)), git: true };
    }
    const parent = path.dirname(current);
    if (parent === current) {
      break;
    }
    current = parent;
  }
  const root = path.resolve(fallbackRoot ?? directory);
  return { root, repository: `local/${path.basename(root)}`, git: false };
}

/** `file` relative to `root` with `/` separators, or undefined when it is not inside `root`. */
export function relativePath(root: string, file: string): string | undefined {
  const relative = path.relative(root, file);
  if (!relative || relative.startsWith("..") || path.isAbsolute(relative)) {
    return undefined;
  }
  return relative.split(path.sep).join("/");
}

/** Caches `findRepository` per directory (a workspace's files share a few directories). */
export class RepositoryResolver {
  private readonly cache = new Map<string, Promise<RepositoryInfo>>();

  constructor(private readonly find: typeof findRepository = findRepository) {}

  resolve(directory: string, fallbackRoot?: string): Promise<RepositoryInfo> {
    const key = `${directory}\0${fallbackRoot ?? ""}`;
    let found = this.cache.get(key);
    if (!found) {
      found = this.find(directory, fallbackRoot);
      this.cache.set(key, found);
    }
    return found;
  }

  /** Forget everything (a remote was added, a folder was moved). */
  clear(): void {
    this.cache.clear();
  }
}
