// Tiny DOM helpers: no framework, just element construction and formatting.

/**
 * Creates an element. `attrs` keys: `class`, `text`, `testid` (-> data-testid),
 * `on<event>` (listener), `dataset`, boolean/other attributes; children may be
 * strings, nodes, arrays, or null/false (skipped).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'testid') el.dataset.testid = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces the children of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Sets text only when it changed (keeps selections and avoids layout churn). */
export function setText(el, text) {
  text = String(text ?? '');
  if (el.textContent !== text) el.textContent = text;
}

const STATE_TONE = {
  running: 'ok',
  stopped: 'off',
  paused: 'warn',
  creating: 'busy',
  starting: 'busy',
  stopping: 'busy',
  deleting: 'busy',
  failed: 'bad',
  missing: 'bad',
  unknown: 'bad',
  succeeded: 'ok',
  pending: 'busy',
  present: 'ok',
  absent: 'bad',
  deleted: 'off',
};

/** A state badge; call `updateBadge` to change it in place. */
export function badge(state, testid) {
  const el = h('span', { class: 'badge', testid });
  updateBadge(el, state);
  return el;
}

export function updateBadge(el, state) {
  state = state || 'unknown';
  setText(el, state);
  const cls = `badge tone-${STATE_TONE[state] || 'off'}`;
  if (el.className !== cls) el.className = cls;
}

export function fmtTime(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  const now = Date.now();
  const age = (now - ms) / 1000;
  if (age >= 0 && age < 60) return `${Math.round(age)} s ago`;
  if (age >= 0 && age < 3600) return `${Math.round(age / 60)} min ago`;
  return d.toLocaleString();
}

export function fmtMemory(mib) {
  if (mib >= 1024 && mib % 1024 === 0) return `${mib / 1024} GiB`;
  return `${mib} MiB`;
}

/** The VM's addresses, e.g. "10.0.0.5/24 (default)". */
export function vmIps(vm) {
  return (vm.nics || []).map((n) => `${n.ip}`).join(', ');
}

/** A compact one-line rendering of a JSON object for tables. */
export function summarize(obj) {
  if (obj === null || obj === undefined) return '';
  if (typeof obj !== 'object') return String(obj);
  return Object.entries(obj)
    .filter(([, v]) => v !== null && v !== undefined && v !== '')
    .map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`)
    .join(' · ');
}

/** A table whose body the caller fills; returns {table, tbody}. */
export function table(headers, testid) {
  const tbody = h('tbody');
  const tbl = h('table', { class: 'table', testid }, h('thead', {}, h('tr', {}, headers.map((t) => h('th', { text: t })))), tbody);
  return { table: h('div', { class: 'table-wrap' }, tbl), tbody };
}

/** A table cell carrying its header as a label (used by the phone card layout). */
export function td(label, ...children) {
  return h('td', { 'data-label': label }, ...children);
}

/**
 * Calls async `fn` now and then every `ms` after each call finishes (no overlap),
 * skipping while the tab is hidden. Returns {stop, now}.
 */
export function every(ms, fn) {
  let timer = null;
  let stopped = false;
  let running = false;
  let again = false;
  const tick = async () => {
    clearTimeout(timer);
    if (stopped) return;
    if (running) {
      again = true;
      return;
    }
    if (!document.hidden) {
      running = true;
      try {
        await fn();
      } catch (e) {
        console.warn(e);
      } finally {
        running = false;
      }
    }
    if (stopped) return;
    if (again) {
      again = false;
      tick();
    } else {
      timer = setTimeout(tick, ms);
    }
  };
  const onVisible = () => !document.hidden && tick();
  document.addEventListener('visibilitychange', onVisible);
  tick();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      document.removeEventListener('visibilitychange', onVisible);
    },
    now: tick,
  };
}
