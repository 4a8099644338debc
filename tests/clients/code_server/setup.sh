#!/usr/bin/env bash
# Sets up what tests/clients/test_code_server.py needs, idempotently and cached outside the
# repository (KAIZEN_CODE_SERVER_CACHE, default ~/.cache/kaizen-tests/code-server):
#
#   - Debian packages: libkrb5-dev (code-server's kerberos module is compiled), ripgrep (in
#     place of the binary @vscode/ripgrep would download from GitHub), a C/C++ tool chain,
#     git, and chromium (driven by Playwright);
#   - code-server as pinned by package-lock.json here (4.100.3: the last line that runs on
#     Node 20), installed with every install script skipped and then the steps of its
#     postinstall.sh run one by one, without @vscode/ripgrep's download;
#   - Playwright for the Python that runs the tests (PYTHON, default python3), without its
#     own browsers: the test drives Debian's /usr/bin/chromium;
#   - the extension's .vsix, built from plugins/vscode with @vscode/vsce (cached per hash of
#     its sources).
#
# On success the last lines are KEY=VALUE pairs for the test (KAIZEN_CODE_SERVER,
# KAIZEN_VSIX, KAIZEN_CHROMIUM). Exit status 77: this machine cannot do it (not root and
# packages missing, no apt-get, no Node 20); the test then skips with this output. Any other
# failure fails the test with this output.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
EXT_SRC="$ROOT/plugins/vscode"
CACHE="${KAIZEN_CODE_SERVER_CACHE:-$HOME/.cache/kaizen-tests/code-server}"
PYTHON="${PYTHON:-python3}"
VERSION="$(node -e "console.log(require('$HERE/package.json').dependencies['code-server'])" 2>/dev/null || true)"

cannot() { echo "setup.sh: cannot set up code-server here: $*" >&2; exit 77; }
step() { echo "setup.sh: $(date -u +%H:%M:%S) $*"; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one setup at a time (parallel test sessions share the cache)

# --- Debian packages -----------------------------------------------------------------------
command -v node >/dev/null && command -v npm >/dev/null || cannot "node and npm are missing"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" = 20 ] || cannot "code-server $VERSION needs Node 20 (this is Node $(node -v))"
[ -n "$VERSION" ] || { echo "setup.sh: no code-server version in $HERE/package.json" >&2; exit 1; }

missing=()
for pkg in libkrb5-dev ripgrep g++ make git chromium; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || cannot "no apt-get to install ${missing[*]}"
  [ "$(id -u)" = 0 ] || cannot "not root: cannot apt-get install ${missing[*]}"
  step "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" || { apt-get update -q && apt-get install -y -q "${missing[@]}"; }
fi
[ -x /usr/bin/chromium ] || { echo "setup.sh: /usr/bin/chromium missing after install" >&2; exit 1; }

# --- Playwright (Python), no browsers of its own ---------------------------------------------
if ! "$PYTHON" -c "import playwright.sync_api" 2>/dev/null; then
  step "pip install playwright"
  "$PYTHON" -m pip install -q playwright
fi

# Node headers: Debian/NodeSource ship them in /usr/include/node; otherwise node-gyp fetches
# them from nodejs.org.
if [ -f /usr/include/node/node.h ]; then
  export npm_config_nodedir=/usr
fi
export npm_config_yes=true  # node-pty's postinstall runs `npx node-gyp`
export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false

# --- code-server ---------------------------------------------------------------------------
key="$(cat "$HERE/package-lock.json" "$HERE/setup.sh" | sha256sum | cut -c1-16)"
INSTALL="$CACHE/install-$VERSION-$key"
CS="$INSTALL/node_modules/code-server"
if [ ! -f "$INSTALL/.done" ]; then
  step "installing code-server $VERSION into $INSTALL"
  rm -rf "$INSTALL"
  mkdir -p "$INSTALL"
  cp "$HERE/package.json" "$HERE/package-lock.json" "$INSTALL/"
  cd "$INSTALL"
  # Every install script skipped: code-server's own postinstall.sh would run `npm install` in
  # lib/vscode, where @vscode/ripgrep's postinstall downloads rg from GitHub (unreachable).
  npm ci --ignore-scripts --loglevel=error
  step "building argon2 (code-server's password hashing; its prebuilt binary is on GitHub)"
  npm rebuild --foreground-scripts argon2
  # What postinstall.sh's vscode_install does, step by step.
  cd "$CS/lib/vscode"
  step "lib/vscode: npm install --omit=dev --ignore-scripts"
  npm install --omit=dev --ignore-scripts --loglevel=error
  step "lib/vscode: building the native modules (kerberos, node-pty, spdlog, watchdog, deviceid)"
  npm rebuild --foreground-scripts kerberos @parcel/watcher node-pty @vscode/spdlog native-watchdog @vscode/deviceid
  step "lib/vscode: Debian's ripgrep in place of @vscode/ripgrep's download"
  mkdir -p node_modules/@vscode/ripgrep/bin
  cp "$(command -v rg)" node_modules/@vscode/ripgrep/bin/rg
  rm -rf node_modules.asar && ln -s node_modules node_modules.asar
  (cd bin/remote-cli && rm -rf code-server && ln -s code-linux.sh code-server)
  (cd bin/helpers && rm -rf browser.sh && ln -s browser-linux.sh browser.sh)
  step "lib/vscode/extensions: npm install --omit=dev"
  (cd extensions && npm install --omit=dev --loglevel=error)
  got="$(XDG_CONFIG_HOME="$INSTALL/.config" XDG_DATA_HOME="$INSTALL/.data" "$CS/out/node/entry.js" --version | tail -n 1)"
  echo "$got"
  case "$got" in "$VERSION "*) ;; *) echo "setup.sh: code-server --version said: $got" >&2; exit 1 ;; esac
  touch "$INSTALL/.done"
  # Installs made by an earlier setup.sh or lock file are not needed any more.
  find "$CACHE" -maxdepth 1 -name 'install-*' -not -path "$INSTALL" -exec rm -rf {} +
fi

# --- the extension's .vsix -----------------------------------------------------------------
ext_key="$(cd "$EXT_SRC" && find package.json package-lock.json tsconfig.json README.md src -type f \
  -not -path 'src/test/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
VSIX="$CACHE/vsix/kaizen-vscode-$ext_key.vsix"
if [ ! -f "$VSIX" ]; then
  step "building the extension's .vsix from $EXT_SRC"
  BUILD="$CACHE/vsix-build"
  mkdir -p "$BUILD" "$CACHE/vsix"
  rm -rf "$BUILD/src" "$BUILD/out"
  cp -r "$EXT_SRC/package.json" "$EXT_SRC/package-lock.json" "$EXT_SRC/tsconfig.json" \
    "$EXT_SRC/README.md" "$EXT_SRC/src" "$BUILD/"
  lock_key="$(sha256sum "$BUILD/package-lock.json" | cut -c1-16)"
  if [ "$(cat "$BUILD/node_modules/.kaizen-lock" 2>/dev/null || true)" != "$lock_key" ]; then
    (cd "$BUILD" && npm ci --loglevel=error && echo "$lock_key" >node_modules/.kaizen-lock)
  fi
  # vsce runs vscode:prepublish (clean, tsc) first.
  (cd "$BUILD" && npx vsce package --no-dependencies --allow-missing-repository --skip-license -o "$CACHE/vsix/partial-$ext_key.vsix")
  mv "$CACHE/vsix/partial-$ext_key.vsix" "$VSIX"
  find "$CACHE/vsix" -name 'kaizen-vscode-*.vsix' -not -path "$VSIX" -delete
fi

echo "KAIZEN_CODE_SERVER=$CS/out/node/entry.js"
echo "KAIZEN_VSIX=$VSIX"
echo "KAIZEN_CHROMIUM=/usr/bin/chromium"
