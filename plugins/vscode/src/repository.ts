// The repository id shared by the extension and the CI hooks (plugins/PROTOCOL.md):
// the `origin` remote's host and path, lower-case, without scheme, user, port or `.git`.

export function normaliseRemote(url: string): string {
  let rest = url.trim();
  let host: string;
  let path: string;
  const scheme = /^[a-z][a-z0-9+.-]*:\/\//i.exec(rest);
  if (scheme) {
    rest = rest.slice(scheme[0].length);
    const slash = rest.indexOf("/");
    const authority = slash === -1 ? rest : rest.slice(0, slash);
    path = slash === -1 ? "" : rest.slice(slash + 1);
    host = authority.slice(authority.lastIndexOf("@") + 1).replace(/:\d*$/, "");
  } else {
    // scp-like syntax: [user@]host:path
    const colon = rest.indexOf(":");
    if (colon === -1) {
      throw new Error(`not a git remote URL: ${url}`);
    }
    const authority = rest.slice(0, colon);
    host = authority.slice(authority.lastIndexOf("@") + 1);
    path = rest.slice(colon + 1);
  }
  path = path.replace(/\/+$/, "").replace(/\.git$/, "").replace(/^\/+/, "");
  return `${host}/${path}`.toLowerCase();
}

/** The id of a workspace folder: its normalised origin, else `local/<folder name>`. */
export function repositoryId(originUrl: string | undefined, folderName: string): string {
  if (originUrl) {
    try {
      return normaliseRemote(originUrl);
    } catch {
      // fall through to the local id
    }
  }
  return `local/${folderName}`;
}

/** The URL of the `origin` remote in the text of a `.git/config` file. */
export function originFromGitConfig(config: string): string | undefined {
  let inOrigin = false;
  for (const raw of config.split(/\r?\n/)) {
    const line = raw.trim();
    if (line.startsWith("[")) {
      inOrigin = /^\[remote\s+"origin"\]$/.test(line);
    } else if (inOrigin) {
      const match = /^url\s*=\s*(.+)$/.exec(line);
      if (match) {
        return match[1].trim();
      }
    }
  }
  return undefined;
}
