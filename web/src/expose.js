// `window.hearth`: the live console objects, for tests and for debugging in devtools.

const hearth = (window.hearth = window.hearth || { term: null, rfb: null });

export function expose(parts) {
  Object.assign(hearth, parts);
}
