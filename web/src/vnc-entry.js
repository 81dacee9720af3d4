// Built separately to dist/vnc.js and loaded on demand when the VNC tab opens, so the
// main bundle stays small and a noVNC problem cannot keep the rest of the app from starting.
export { default as RFB } from '@novnc/novnc';
