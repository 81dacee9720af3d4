#!/usr/bin/env bash
# Builds the web console (web/ -> web/dist/) from the npm packages pinned in
# web/package-lock.json: xterm.js and noVNC bundled with esbuild. hearth-api embeds
# web/dist/ when it is compiled, so run this before cargo build.
# Usage: scripts/build-web.sh
set -euo pipefail
cd "$(dirname "$0")/../web"
command -v npm >/dev/null || { echo "build-web: npm is missing (install Node.js 20 and npm)" >&2; exit 1; }
# npm ci is slow even when nothing changed: skip it while the lock file is unchanged.
stamp=node_modules/.hearth-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
	npm ci --no-audit --no-fund --loglevel=error
	echo "$want" >"$stamp"
fi
npm run --silent build
echo "build-web: web/dist is ready"
