// The VNC screen: noVNC's RFB client over the VM's VNC WebSocket.

import { consoleUrl } from './api.js';
import { expose } from './expose.js';

let rfbModule;
function loadRfb() {
  // dist/vnc.js sits next to dist/app.js (both under /assets/).
  rfbModule ||= import(new URL('./vnc.js', import.meta.url).href).catch((e) => {
    rfbModule = null;
    throw e;
  });
  return rfbModule;
}

export class VncScreen {
  /** `el`: the element noVNC draws into; `onStatus(state, message)` as for the serial console. */
  constructor(el, vmId, onStatus) {
    this.el = el;
    this.vmId = vmId;
    this.onStatus = onStatus;
    this.rfb = null;
    this.state = 'idle';
    this.sizeWatch = null;
  }

  get connected() {
    return this.state === 'connecting' || this.state === 'connected';
  }

  setState(state, message = '') {
    this.state = state;
    this.onStatus(state, message);
  }

  async connect() {
    if (this.connected || this.disposed) return;
    this.setState('connecting', 'Connecting…');
    let RFB;
    let url;
    try {
      ({ RFB } = await loadRfb());
    } catch (e) {
      this.setState('error', `Cannot load the VNC viewer: ${e.message}`);
      return;
    }
    try {
      url = await consoleUrl(this.vmId, 'vnc', true);
    } catch (e) {
      this.setState('error', e.status === 409 ? `This VM has no display: ${e.message}` : `Cannot open the screen: ${e.message}`);
      return;
    }
    if (this.disposed) return;
    this.el.replaceChildren();
    let rfb;
    try {
      rfb = new RFB(this.el, url, { shared: true });
    } catch (e) {
      this.setState('error', `Cannot start the VNC viewer: ${e.message}`);
      return;
    }
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.background = '#0d1015';
    rfb.addEventListener('connect', () => {
      this.setState('connected', 'Connected');
      this.watchSize(rfb);
    });
    rfb.addEventListener('disconnect', (ev) => {
      if (this.rfb !== rfb) return;
      this.rfb = null;
      this.stopWatch();
      expose({ rfb: null });
      if (!this.disposed) this.setState('closed', ev.detail?.clean ? 'Disconnected' : 'The connection was lost');
    });
    rfb.addEventListener('securityfailure', (ev) => {
      this.setState('error', `VNC security failure: ${ev.detail?.reason || ev.detail?.status}`);
    });
    this.rfb = rfb;
    expose({ rfb });
  }

  /**
   * Sizes the box to the framebuffer's aspect ratio (at most 75% of the window's
   * height), so the scaled picture fills it instead of floating in a letterbox.
   */
  watchSize(rfb) {
    const canvas = rfb._canvas || this.el.querySelector('canvas');
    if (!canvas) return;
    const apply = () => {
      const w = this.el.clientWidth;
      if (!canvas.width || !canvas.height || !w) return;
      const height = Math.round(Math.min((w * canvas.height) / canvas.width, window.innerHeight * 0.75));
      this.el.style.height = `${height}px`;
    };
    apply();
    this.stopWatch();
    const mo = new MutationObserver(apply);
    mo.observe(canvas, { attributes: true, attributeFilter: ['width', 'height'] });
    window.addEventListener('resize', apply);
    this.sizeWatch = () => {
      mo.disconnect();
      window.removeEventListener('resize', apply);
    };
  }

  /** Re-applies the size (after the tab becomes visible). */
  refit() {
    if (this.rfb) this.watchSize(this.rfb);
  }

  stopWatch() {
    if (this.sizeWatch) this.sizeWatch();
    this.sizeWatch = null;
  }

  sendCtrlAltDel() {
    if (this.rfb) this.rfb.sendCtrlAltDel();
  }

  disconnect() {
    const rfb = this.rfb;
    this.rfb = null;
    this.stopWatch();
    expose({ rfb: null });
    if (rfb) rfb.disconnect();
    if (!this.disposed) this.setState('closed', 'Disconnected');
  }

  dispose() {
    this.disposed = true;
    this.disconnect();
  }
}
