// Builds the web console into dist/: index.html, app.js (+ vnc.js, loaded on demand) and
// app.css (ours plus xterm's). hearth-api embeds dist/ and serves it at / and /assets/.
import { build } from 'esbuild';
import { mkdir, readFile, rm, writeFile, copyFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = dirname(fileURLToPath(import.meta.url));
const src = join(root, 'src');
const dist = join(root, 'dist');
const require = createRequire(import.meta.url);

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });

// ES modules for es2022: noVNC uses top-level await.
const common = {
  bundle: true,
  format: 'esm',
  target: 'es2022',
  minify: true,
  legalComments: 'eof',
  logLevel: 'warning',
  absWorkingDir: root,
};
await build({ ...common, entryPoints: { app: join(src, 'app.js') }, outdir: dist });
await build({ ...common, entryPoints: { vnc: join(src, 'vnc-entry.js') }, outdir: dist });

const xtermCss = await readFile(require.resolve('@xterm/xterm/css/xterm.css'), 'utf8');
const ourCss = await readFile(join(src, 'style.css'), 'utf8');
const css = await build({
  stdin: { contents: `${xtermCss}\n${ourCss}`, loader: 'css', resolveDir: src },
  bundle: true,
  minify: true,
  write: false,
  logLevel: 'warning',
  target: ['chrome100', 'firefox100', 'safari15'],
});
await writeFile(join(dist, 'app.css'), css.outputFiles[0].contents);
await copyFile(join(src, 'index.html'), join(dist, 'index.html'));

console.log('built dist/: index.html app.js vnc.js app.css');
