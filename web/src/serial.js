// The serial console: xterm.js over the console WebSocket (binary frames both ways).

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { consoleUrl } from './api.js';
import { expose } from './expose.js';

// Focusing the terminal on a phone pops up the on-screen keyboard: only do it with a mouse.
const finePointer = () => window.matchMedia?.('(pointer: fine)').matches ?? true;

const FONT = 'ui-monospace, "SF Mono", Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", "Noto Sans Mono", monospace';

export class SerialConsole {
  /**
   * `el`: the element the terminal lives in; `onStatus(state, message)` reports
   * "connecting", "connected", "closed" or "error".
   */
  constructor(el, vmId, onStatus) {
    this.el = el;
    this.vmId = vmId;
    this.onStatus = onStatus;
    this.ws = null;
    this.state = 'idle';
    this.encoder = new TextEncoder();
    this.term = new Terminal({
      cursorBlink: true,
      fontFamily: FONT,
      fontSize: window.innerWidth < 500 ? 12 : 14,
      scrollback: 5000,
      allowProposedApi: false,
      theme: { background: '#14181f', foreground: '#dfe4ea', cursor: '#9ecbff', selectionBackground: '#3a4a63' },
    });
    this.fitAddon = new FitAddon();
    this.term.loadAddon(this.fitAddon);
    this.term.open(el);
    this.term.onData((d) => {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(this.encoder.encode(d));
    });
    this.resizeObserver = new ResizeObserver(() => this.fit());
    this.resizeObserver.observe(el);
    this.fit();
    expose({ term: this.term });
  }

  focus() {
    if (finePointer()) this.term.focus();
  }

  fit() {
    // A hidden terminal has no size; fitting it would give NaN columns.
    if (!this.el.offsetWidth || !this.el.offsetHeight) return;
    try {
      this.fitAddon.fit();
    } catch {
      /* not rendered yet */
    }
  }

  get connected() {
    return this.state === 'connecting' || this.state === 'connected';
  }

  setState(state, message = '') {
    this.state = state;
    this.onStatus(state, message);
  }

  /**
   * Opens the console. The server lets one session type at a time; when the
   * writable connection is refused, a read-only one is tried before giving up.
   */
  async connect(write = true) {
    if (this.disposed || (write && this.connected)) return;
    this.setState('connecting', 'Connecting…');
    let url;
    try {
      url = await consoleUrl(this.vmId, 'serial', write);
    } catch (e) {
      this.setState('error', `Cannot open the console: ${e.message}`);
      return;
    }
    if (this.disposed) return;
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.writable = write;
    this.term.options.disableStdin = !write;
    let first = true;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.setState('connected', write ? 'Connected' : 'Connected read-only: another console session has the keyboard');
    };
    ws.onmessage = (ev) => {
      if (first) {
        // The first frame is the scrollback: start from a clean screen so a
        // reconnect does not show the history twice.
        first = false;
        this.term.reset();
      }
      this.term.write(typeof ev.data === 'string' ? ev.data : new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.disposed) return;
      if (!opened && write) {
        this.connect(false);
        return;
      }
      const why = ev.reason ? `: ${ev.reason}` : '';
      this.setState('closed', opened ? `Disconnected${why}` : `The console refused the connection${why} (is the VM running?)`);
    };
  }

  /** Drops the current connection (if any) and opens a writable one. */
  reconnect() {
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close();
    this.state = 'idle';
    this.connect(true);
  }

  disconnect() {
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close();
    if (!this.disposed) this.setState('closed', 'Disconnected');
  }

  dispose() {
    this.disposed = true;
    this.resizeObserver.disconnect();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close();
    }
    this.term.dispose();
    expose({ term: null });
  }
}
