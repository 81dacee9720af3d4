// The hearth REST API client: bearer-key auth, JSON in and out, typed errors.

const KEY = 'hearth.apiKey';

export function getKey() {
  try {
    return sessionStorage.getItem(KEY) || '';
  } catch {
    return '';
  }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY, key);
    else sessionStorage.removeItem(KEY);
  } catch {
    /* storage disabled: the key lives only as long as the page */
  }
  memoryKey = key || '';
}

let memoryKey = '';
const currentKey = () => getKey() || memoryKey;

/** An API failure; `message` is what the user should read. */
export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// Called when the server rejects the stored key (set by the app shell).
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

/**
 * Calls the API. `opts.key` overrides the stored key (sign-in check);
 * `opts.signal` aborts. Resolves to the parsed JSON body (or null).
 */
export async function api(method, path, body, opts = {}) {
  const key = opts.key ?? currentKey();
  const headers = { Accept: 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: opts.signal,
      cache: 'no-store',
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'Cannot reach the hearth server. Check your connection.');
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const err = data && data.error;
    const e = new ApiError(
      res.status,
      err?.code || `http_${res.status}`,
      err?.message || `${res.status} ${res.statusText || 'request failed'}`,
      err?.details,
    );
    if (res.status === 401 && opts.key === undefined) onUnauthorized(e);
    throw e;
  }
  return data;
}

export const get = (path, opts) => api('GET', path, undefined, opts);
export const post = (path, body, opts) => api('POST', path, body ?? {}, opts);
export const del = (path, opts) => api('DELETE', path, undefined, opts);
export const patch = (path, body, opts) => api('PATCH', path, body, opts);

/** A text answer (a log, a PEM file). */
export async function getText(path) {
  const key = currentKey();
  const res = await fetch(path, { headers: key ? { Authorization: `Bearer ${key}` } : {}, cache: 'no-store' });
  const text = await res.text();
  if (!res.ok) {
    let message = `${res.status} ${res.statusText || 'request failed'}`;
    try {
      message = JSON.parse(text).error?.message || message;
    } catch {
      // not JSON
    }
    throw new ApiError(res.status, `http_${res.status}`, message);
  }
  return text;
}

export const vmPath = (id) => `/v1/vms/${encodeURIComponent(id)}`;

/** A fresh single-use ticket for a console WebSocket, and the URL to open with it. */
export async function consoleUrl(vmId, kind, write = true) {
  const t = await post(`${vmPath(vmId)}/console/ticket`, { kind, write });
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const endpoint = kind === 'vnc' ? 'vnc' : 'console';
  return `${proto}//${location.host}${vmPath(t.vm || vmId)}/${endpoint}?ticket=${encodeURIComponent(t.ticket)}`;
}
