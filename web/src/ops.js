// Follows long-running operations (202 Accepted) and shows them as activity toasts.

import { get, ApiError } from './api.js';
import { h, setText, updateBadge, badge } from './dom.js';

const DONE = new Set(['succeeded', 'failed']);
let tray;

function ensureTray() {
  if (!tray || !tray.isConnected) {
    tray = h('div', { class: 'tray', testid: 'activity', 'aria-live': 'polite' });
    document.body.append(tray);
  }
  return tray;
}

/** Shows a short message in the tray; `tone` is "ok", "bad" or "info". */
export function notify(message, tone = 'info', ttlMs = tone === 'bad' ? 0 : 5000) {
  const close = h('button', { class: 'link close', 'aria-label': 'Dismiss', text: '×' });
  const item = h('div', { class: `toast toast-${tone}`, role: tone === 'bad' ? 'alert' : 'status' }, h('span', { class: 'toast-text', text: message }), close);
  close.addEventListener('click', () => item.remove());
  ensureTray().append(item);
  if (ttlMs) setTimeout(() => item.remove(), ttlMs);
  return item;
}

/**
 * Follows an operation until it is done, long-polling `/v1/operations/{id}?wait=10`.
 * Shows a toast labelled `label` that tracks it; `onUpdate(op)` is called on every
 * change. Resolves to the final operation (a failed one resolves too).
 */
export async function follow(op, label, onUpdate = () => {}) {
  const text = h('span', { class: 'toast-text' });
  const state = badge(op.status);
  const close = h('button', { class: 'link close', 'aria-label': 'Dismiss', text: '×' });
  const item = h('div', { class: 'toast', role: 'status', testid: `op-${op.id}` }, state, text, close);
  close.addEventListener('click', () => item.remove());
  ensureTray().append(item);

  const show = (o) => {
    updateBadge(state, o.status);
    const msg = o.status === 'failed' ? o.error?.message || o.progress || 'failed' : o.progress;
    setText(text, msg ? `${label}: ${msg}` : label);
    item.className = `toast ${o.status === 'failed' ? 'toast-bad' : o.status === 'succeeded' ? 'toast-ok' : ''}`;
    onUpdate(o);
  };
  show(op);

  let failures = 0;
  while (!DONE.has(op.status)) {
    try {
      op = await get(`/v1/operations/${encodeURIComponent(op.id)}?wait=10`);
      failures = 0;
      show(op);
    } catch (e) {
      if (e instanceof ApiError && (e.status === 401 || e.status === 404)) {
        setText(text, `${label}: ${e.message}`);
        item.className = 'toast toast-bad';
        return { ...op, status: 'failed', error: { code: e.code, message: e.message } };
      }
      if (++failures > 30) {
        setText(text, `${label}: lost track (${e.message})`);
        return op;
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
  if (op.status === 'succeeded') setTimeout(() => item.remove(), 6000);
  return op;
}
