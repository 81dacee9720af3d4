// End-to-end test of the hearth web console against a live hearth-api, in Debian's
// Chromium driven by playwright-core.
//
//   HEARTH_URL=http://127.0.0.1:18080 HEARTH_API_KEY=... ARTIFACTS=/tmp/e2e \
//   QMP_DIR_TEMPLATE=/run/vmm-manager/vms/{id}/qmp.sock node tests/e2e.mjs
//
// Optional: CHROMIUM (default /usr/bin/chromium), E2E_VM_NAME (default e2e),
// E2E_IMAGE (default tiny). Exit code 0 on success, 1 on failure.

import net from 'node:net';
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { resolve, join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const MARKER = 'HEARTH-GUEST-READY';
const t0 = Date.now();

export function log(msg) {
  const s = ((Date.now() - t0) / 1000).toFixed(1).padStart(6);
  console.log(`[e2e ${s}s] ${msg}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** An error that stops `until` at once instead of being retried. */
function fatal(message) {
  const e = new Error(message);
  e.fatal = true;
  return e;
}

/** Polls async `fn` until it returns a truthy value; throws `message` (plus the last value) on timeout. */
async function until(fn, timeoutMs, message, intervalMs = 500) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last && last.ok !== false) return last;
    } catch (e) {
      if (e.fatal) throw e;
      last = `error: ${e.message}`;
    }
    if (Date.now() > end) {
      const detail = last && typeof last === 'object' ? JSON.stringify(last) : String(last);
      throw new Error(`${message} (waited ${Math.round(timeoutMs / 1000)} s; last seen: ${detail})`);
    }
    await sleep(intervalMs);
  }
}

// ---------------------------------------------------------------------------
// REST helpers (setup/cleanup and finding the VM id; the UI itself is what is tested)

async function rest(base, key, method, path, body) {
  const res = await fetch(new URL(path, base), {
    method,
    headers: { Authorization: `Bearer ${key}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  return { status: res.status, data };
}

/** Deletes a VM left over by an earlier run, so the test starts clean. */
async function removeLeftover(base, key, name) {
  const { status, data } = await rest(base, key, 'GET', `/v1/vms/${name}`);
  if (status === 404) return;
  if (status !== 200) throw new Error(`GET /v1/vms/${name} answered ${status}: ${JSON.stringify(data)}`);
  log(`a VM named ${name} is left over from an earlier run (state ${data.state}); removing it`);
  if (!['stopped', 'failed', 'missing', 'deleting'].includes(data.state)) {
    const r = await rest(base, key, 'POST', `/v1/vms/${data.id}/stop`);
    if (r.status === 202) await waitOperation(base, key, r.data.operation.id);
  }
  if (data.state !== 'deleting') {
    const r = await rest(base, key, 'DELETE', `/v1/vms/${data.id}`);
    if (r.status === 202) await waitOperation(base, key, r.data.operation.id);
  }
  await until(async () => (await rest(base, key, 'GET', `/v1/vms/${data.id}`)).status === 404, 120_000, `the leftover VM ${name} did not go away`, 1000);
}

async function waitOperation(base, key, id) {
  for (let i = 0; i < 15; i++) {
    const { data } = await rest(base, key, 'GET', `/v1/operations/${id}?wait=10`);
    if (data && (data.status === 'succeeded' || data.status === 'failed')) return data;
  }
  throw new Error(`operation ${id} did not finish`);
}

// ---------------------------------------------------------------------------
// QMP: QEMU's own screendump, to compare with what noVNC shows

/**
 * Connects to a QMP Unix socket, negotiates capabilities and runs `screendump` into
 * `filename` (PNG). Resolves when QEMU has answered; rejects with QEMU's error.
 */
export function qmpScreendump(socketPath, filename, timeoutMs = 20_000) {
  return new Promise((resolvePromise, reject) => {
    const sock = net.createConnection(socketPath);
    let buf = '';
    let stage = 'greeting';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`QMP at ${socketPath}: no answer at stage "${stage}" within ${timeoutMs / 1000} s (does another client hold the QMP socket?)`));
    }, timeoutMs);
    const done = (err) => {
      clearTimeout(timer);
      sock.end();
      sock.destroy();
      if (err) reject(err);
      else resolvePromise();
    };
    const send = (obj) => sock.write(`${JSON.stringify(obj)}\r\n`);
    sock.on('error', (e) => done(new Error(`QMP at ${socketPath}: ${e.message}`)));
    sock.on('close', () => stage !== 'done' && done(new Error(`QMP at ${socketPath} closed at stage "${stage}"`)));
    sock.on('data', (chunk) => {
      buf += chunk.toString('utf8');
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        let msg;
        try {
          msg = JSON.parse(line);
        } catch {
          continue;
        }
        if (msg.event) continue; // asynchronous events interleave; ignore them
        if (stage === 'greeting' && msg.QMP) {
          stage = 'capabilities';
          send({ execute: 'qmp_capabilities' });
        } else if (msg.error) {
          stage = 'done';
          done(new Error(`QMP ${msg.error.class || 'error'}: ${msg.error.desc || JSON.stringify(msg.error)}`));
          return;
        } else if (stage === 'capabilities' && 'return' in msg) {
          stage = 'screendump';
          send({ execute: 'screendump', arguments: { filename, format: 'png' } });
        } else if (stage === 'screendump' && 'return' in msg) {
          stage = 'done';
          done();
          return;
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------
// In-page helpers (run inside Chromium)

/** The xterm buffer as lines of text. */
function termLines() {
  const t = window.hearth && window.hearth.term;
  if (!t) return null;
  const b = t.buffer.active;
  const out = [];
  for (let i = 0; i < b.length; i++) {
    const line = b.getLine(i);
    if (line) out.push(line.translateToString(true));
  }
  return out;
}

/** The noVNC canvas: size and how non-blank it is. */
function vncCanvasInfo() {
  const c = (window.hearth && window.hearth.rfb && window.hearth.rfb._canvas) || document.querySelector('[data-testid="vnc"] canvas');
  if (!c) return { ok: false, why: 'no canvas yet' };
  if (!c.width || !c.height) return { ok: false, why: 'canvas has no size yet', width: c.width, height: c.height };
  const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const px = new Uint32Array(data.buffer, data.byteOffset, data.byteLength / 4);
  const counts = new Map();
  let top = 0;
  for (let i = 0; i < px.length; i++) {
    const n = (counts.get(px[i]) || 0) + 1;
    counts.set(px[i], n);
    if (n > top) top = n;
  }
  const differing = (px.length - top) / px.length;
  return { ok: differing >= 0.005, width: c.width, height: c.height, differingPercent: +(differing * 100).toFixed(2) };
}

/** Compares the noVNC canvas with a PNG (base64), pixel by pixel within `tol` per channel. */
async function compareWithPng({ pngBase64, tol }) {
  const c = (window.hearth && window.hearth.rfb && window.hearth.rfb._canvas) || document.querySelector('[data-testid="vnc"] canvas');
  if (!c) return { error: 'no noVNC canvas' };
  const w = c.width;
  const h = c.height;
  const a = c.getContext('2d').getImageData(0, 0, w, h).data;
  const bytes = Uint8Array.from(atob(pngBase64), (ch) => ch.charCodeAt(0));
  const blob = new Blob([bytes], { type: 'image/png' });
  let img;
  try {
    // No colour management: compare the raw pixel values QEMU wrote.
    img = await createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  } catch {
    img = new Image();
    img.src = `data:image/png;base64,${pngBase64}`;
    await img.decode();
  }
  const iw = img.width;
  const ih = img.height;
  if (iw !== w || ih !== h) return { width: w, height: h, pngWidth: iw, pngHeight: ih, matchPercent: 0 };
  const off = document.createElement('canvas');
  off.width = w;
  off.height = h;
  const ctx = off.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const b = ctx.getImageData(0, 0, w, h).data;
  let same = 0;
  for (let i = 0; i < a.length; i += 4) {
    if (Math.abs(a[i] - b[i]) <= tol && Math.abs(a[i + 1] - b[i + 1]) <= tol && Math.abs(a[i + 2] - b[i + 2]) <= tol) same++;
  }
  return { width: w, height: h, pngWidth: iw, pngHeight: ih, matchPercent: +((same / (w * h)) * 100).toFixed(3) };
}

// ---------------------------------------------------------------------------

async function main() {
  const BASE = process.env.HEARTH_URL;
  const KEY = process.env.HEARTH_API_KEY;
  const ARTIFACTS = resolve(process.env.ARTIFACTS || 'e2e-artifacts');
  const QMP_TEMPLATE = process.env.QMP_DIR_TEMPLATE;
  const NAME = process.env.E2E_VM_NAME || 'e2e';
  const IMAGE = process.env.E2E_IMAGE || 'tiny';
  if (!BASE || !KEY) throw new Error('set HEARTH_URL and HEARTH_API_KEY');
  if (!QMP_TEMPLATE || !QMP_TEMPLATE.includes('{id}')) throw new Error('set QMP_DIR_TEMPLATE to the QMP socket path with {id} in it');
  await mkdir(ARTIFACTS, { recursive: true });

  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (e) {
    throw new Error(`cannot load playwright-core (run npm ci in web/): ${e.message}`);
  }

  log(`hearth at ${BASE}; artifacts in ${ARTIFACTS}`);
  await removeLeftover(BASE, KEY, NAME);

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  page.on('dialog', (d) => {
    log(`dialog: "${d.message()}" -> accept`);
    d.accept().catch(() => {});
  });
  page.on('pageerror', (e) => log(`[browser] page error: ${e.message}`));
  page.on('console', (m) => {
    if ((m.type() === 'error' || m.type() === 'warning') && !/willReadFrequently/.test(m.text())) log(`[browser ${m.type()}] ${m.text()}`);
  });

  const shot = async (file, target = page) => {
    try {
      await target.screenshot({ path: join(ARTIFACTS, file) });
      log(`screenshot ${file}`);
    } catch (e) {
      log(`screenshot ${file} failed: ${e.message}`);
    }
  };
  let stepNo = 0;
  const step = async (title, fn) => {
    stepNo++;
    log(`step ${stepNo}: ${title}`);
    try {
      return await fn();
    } catch (e) {
      await shot(`failed-step-${stepNo}.png`);
      throw new Error(`step ${stepNo} (${title}) failed: ${e.message}`);
    }
  };
  // The text of an element that may vanish between looking and reading (the page
  // re-renders every 2 s): null instead of waiting for it to come back.
  const text = async (locator) => {
    const t = await locator.first().textContent({ timeout: 1_000 }).catch(() => null);
    return t === null ? null : t.trim();
  };
  const row = page.locator(`[data-testid="vm-row-${NAME}"]`);
  const rowState = async () => ((await row.count()) ? ((await text(row.locator('[data-testid="vm-state"]'))) ?? '(re-rendering)') : '(no row)');
  const pageState = async () => (await text(page.locator('[data-testid="vm-page-state"]'))) ?? '(re-rendering)';

  try {
    await step('sign in', async () => {
      await page.goto(BASE, { waitUntil: 'domcontentloaded' });
      await page.locator('[data-testid="api-key"]').fill(KEY);
      await page.locator('[data-testid="sign-in"]').click();
      const err = page.locator('[data-testid="sign-in-error"]');
      await until(
        async () => {
          if ((await page.locator('[data-testid="create-form"]').count()) > 0) return true;
          const msg = (await err.count()) ? ((await text(err)) ?? '') : '';
          if (msg) throw fatal(`sign-in refused: ${msg}`);
          return false;
        },
        20_000,
        'the VM list did not appear after signing in',
      );
      await page.locator('[data-testid="create-image"][data-loaded]').waitFor();
      await shot('signed-in.png');
      await page.setViewportSize({ width: 390, height: 844 });
      await sleep(300);
      await shot('phone-vms.png');
      await page.setViewportSize({ width: 1280, height: 900 });
    });

    await step(`create VM ${NAME} (${IMAGE}, qemu, VNC, no NIC) and wait for running`, async () => {
      const imageSelect = page.locator('[data-testid="create-image"]');
      const images = await imageSelect.locator('option').evaluateAll((os) => os.map((o) => o.value));
      if (!images.includes(IMAGE)) throw new Error(`image ${IMAGE} is not offered (offered: ${images.join(', ') || 'none'})`);
      await page.locator('[data-testid="create-network"][data-loaded]').waitFor();
      await page.locator('[data-testid="create-name"]').fill(NAME);
      await imageSelect.selectOption(IMAGE);
      await page.locator('[data-testid="create-hypervisor"]').selectOption('qemu');
      await page.locator('[data-testid="create-vcpus"]').fill('1');
      await page.locator('[data-testid="create-memory"]').fill('256');
      await page.locator('[data-testid="create-vnc"]').check();
      await page.locator('[data-testid="create-network"]').selectOption({ label: 'none' });
      await page.locator('[data-testid="create-submit"]').click();
      const status = page.locator('[data-testid="create-status"]');
      await until(
        async () => {
          const s = await rowState();
          const st = (await text(status)) ?? '';
          const bad = /tone-text-bad/.test((await status.getAttribute('class')) || '');
          if (s === 'failed' || bad) throw fatal(`creation failed: row state "${s}", form says "${st}"`);
          return s === 'running' || { ok: false, row: s, form: st };
        },
        120_000,
        `the row of ${NAME} did not show "running"`,
      );
      log(`${NAME} is running`);
    });

    const vmId = await step('open the VM page and wait for the guest', async () => {
      await row.locator('a.vm-name').click();
      await page.locator('[data-testid="console"]').waitFor();
      const id = decodeURIComponent(new URL(page.url()).hash.replace(/^#\/vms\//, ''));
      await until(
        async () => {
          const lines = await page.evaluate(termLines);
          if (!lines) return { ok: false, why: 'window.hearth.term not set', status: await text(page.locator('[data-testid="console-status"]')) };
          return lines.some((l) => l.includes(MARKER)) || { ok: false, status: await text(page.locator('[data-testid="console-status"]')), tail: lines.filter(Boolean).slice(-3) };
        },
        120_000,
        `the serial console never showed ${MARKER}`,
        1000,
      );
      log(`console shows ${MARKER}`);
      const { data } = await rest(BASE, KEY, 'GET', `/v1/vms/${encodeURIComponent(NAME)}`);
      return data?.id || id;
    });

    await step('type into the serial console', async () => {
      await page.locator('[data-testid="console"]').click();
      await page.keyboard.type('echo $((6*7))');
      await page.keyboard.press('Enter');
      await until(
        async () => {
          const lines = (await page.evaluate(termLines)) || [];
          return lines.some((l) => l.trim() === '42') || { ok: false, tail: lines.filter(Boolean).slice(-4) };
        },
        30_000,
        'no console line reads exactly "42" after typing echo $((6*7))',
      );
      log('console answered 42');
      await shot('console-42.png');
    });

    await step('grow the running VM and snapshot it with memory, from its page', async () => {
      const careStatus = async () => (await text(page.locator('[data-testid="care-status"]'))) || '';
      // A QEMU VM has no memory room unless asked at create: the page says a restart
      // is needed, and nothing changes.
      await page.locator('[data-testid="resize-memory"]').fill('384');
      await page.locator('[data-testid="resize-submit"]').click();
      await until(async () => (await careStatus()).includes('needs a restart') || { ok: false, status: await careStatus() }, 30_000, 'the page did not say a restart is needed');
      // vCPUs grow by hot-plug (their room defaults to the host's CPUs: 2 here).
      await page.locator('[data-testid="resize-memory"]').fill('256');
      await page.locator('[data-testid="resize-vcpus"]').fill('2');
      await page.locator('[data-testid="resize-submit"]').click();
      await until(async () => (await careStatus()).includes('Now 2 vCPUs') || { ok: false, status: await careStatus() }, 30_000, 'the page did not report the new size');
      await page.locator('[data-testid="snapshot-name"]').fill('e2e-snap');
      await page.locator('[data-testid="snapshot-memory"]').check();
      await page.locator('[data-testid="snapshot-submit"]').click();
      const row = page.locator('[data-testid="snapshot-row-e2e-snap"]');
      await until(
        async () => {
          const t = (await row.count()) ? await row.innerText() : '';
          return (t.includes('ready') && t.includes('yes')) || { ok: false, row: t, status: await text(page.locator('[data-testid="care-status"]')) };
        },
        60_000,
        'the snapshot did not show as ready with memory',
      );
      log('told a restart is needed for memory, grew to 2 vCPUs, took a snapshot with memory');
      await shot('snapshot.png');
    });

    await step('VNC screen matches QEMU screendump', async () => {
      await page.locator('[data-testid="tab-vnc"]').click();
      const vncBox = page.locator('[data-testid="vnc"]');
      await vncBox.waitFor({ state: 'visible', timeout: 10_000 }).catch(async () => {
        const note = page.locator('[data-testid="vnc-none"]');
        throw new Error(`the VNC screen is not shown${(await note.isVisible()) ? `: ${await text(note)}` : ''}`);
      });
      const info = await until(
        async () => {
          const i = await page.evaluate(vncCanvasInfo);
          return i.ok ? i : { ...i, status: await text(page.locator('[data-testid="vnc-status"]')) };
        },
        60_000,
        'the noVNC canvas stayed missing or blank',
        1000,
      );
      log(`noVNC canvas ${info.width}x${info.height}, ${info.differingPercent}% of pixels differ from the most common colour`);

      const socketPath = QMP_TEMPLATE.replaceAll('{id}', vmId);
      // QEMU runs jailed: it can write only inside its own VM directory.
      const pngPath = join(dirname(socketPath), 'qmp-screendump.png');
      let best = null;
      for (let attempt = 1; attempt <= 5; attempt++) {
        await rm(pngPath, { force: true });
        await qmpScreendump(socketPath, pngPath);
        await until(async () => (await stat(pngPath)).size > 0, 5000, `QEMU did not write ${pngPath}`, 100);
        const png = await readFile(pngPath);
        await writeFile(join(ARTIFACTS, 'qmp-screendump.png'), png);
        const r = await page.evaluate(compareWithPng, { pngBase64: png.toString('base64'), tol: 16 });
        if (r.error) throw new Error(r.error);
        log(`attempt ${attempt}: noVNC ${r.width}x${r.height}, QEMU ${r.pngWidth}x${r.pngHeight}, ${r.matchPercent}% of pixels match`);
        if (!best || r.matchPercent > best.matchPercent) best = r;
        if (r.width === r.pngWidth && r.height === r.pngHeight && r.matchPercent >= 98) break;
        await sleep(1000);
      }
      await shot('vnc.png', vncBox);
      if (best.width !== best.pngWidth || best.height !== best.pngHeight) {
        throw new Error(`size differs: noVNC canvas ${best.width}x${best.height}, QEMU screendump ${best.pngWidth}x${best.pngHeight}`);
      }
      if (best.matchPercent < 98) throw new Error(`only ${best.matchPercent}% of pixels match QEMU's screendump (need 98%)`);
      log(`VNC matches QEMU's screendump: ${best.matchPercent}% of pixels`);
    });

    await step('the databases page lists none and shows a refused create with its reason', async () => {
      await page.locator('[data-testid="nav-databases"]').click();
      await page.locator('[data-testid="db-create-form"]').waitFor();
      await until(async () => page.getByText('No databases.').isVisible(), 15_000, 'the empty list was not shown');
      await page.locator('[data-testid="db-create-name"]').fill('e2e-db');
      await page.locator('[data-testid="db-create-storage"]').fill('0');
      await page.locator('[data-testid="db-create-submit"]').click();
      const status = page.locator('[data-testid="db-create-status"]');
      await until(async () => /storage/.test((await status.textContent()) || '') || { ok: false, status: await status.textContent() }, 15_000, 'the refusal was not shown');
      log(`refused as it should be: ${await status.textContent()}`);
      // Back to the VM's page, where the next step stops it.
      await page.evaluate((id) => { location.hash = `#/vms/${encodeURIComponent(id)}`; }, vmId);
      await page.locator('[data-testid="vm-stop"]').waitFor();
    });

    await step(`stop and delete ${NAME}`, async () => {
      await page.locator('[data-testid="vm-stop"]').click();
      await until(async () => (await pageState()) === 'stopped' || { ok: false, state: await pageState() }, 120_000, `${NAME} did not reach "stopped"`);
      log(`${NAME} is stopped`);
      await until(async () => page.locator('[data-testid="vm-delete"]').isEnabled(), 10_000, 'the Delete button stayed disabled');
      await page.locator('[data-testid="vm-delete"]').click();
      await until(async () => new URL(page.url()).hash === '#/vms', 30_000, 'the app did not return to the VM list after Delete', 250);
      await until(async () => (await row.count()) === 0 || { ok: false, row: await rowState() }, 120_000, `the row of ${NAME} did not disappear`);
      log(`${NAME} is gone`);
      await shot('deleted.png');
    });
  } finally {
    await browser.close().catch(() => {});
  }
  log('all steps passed');
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const guard = setTimeout(() => {
    console.error('E2E FAILED: the whole test took longer than 15 minutes');
    process.exit(1);
  }, 15 * 60_000);
  guard.unref();
  main().then(
    () => {
      console.log('E2E PASSED');
      process.exit(0);
    },
    (e) => {
      console.error(`E2E FAILED: ${e.message}`);
      process.exit(1);
    },
  );
}
