// The sign-in screen: an API key, checked with `GET /v1/vms`.

import { get, setKey } from '../api.js';
import { h, replace, setText } from '../dom.js';

export function mountSignIn(root, onSignedIn, notice = '') {
  const key = h('input', {
    type: 'password',
    id: 'api-key',
    name: 'api-key',
    testid: 'api-key',
    autocomplete: 'current-password',
    autocapitalize: 'none',
    spellcheck: 'false',
    required: true,
    placeholder: 'hearth API key',
  });
  const submit = h('button', { type: 'submit', class: 'btn btn-primary', text: 'Sign in', testid: 'sign-in' });
  const error = h('p', { class: 'form-status tone-text-bad', role: 'alert', testid: 'sign-in-error' });
  setText(error, notice);
  const form = h(
    'form',
    { class: 'card signin' },
    h('h1', { text: 'Sign in to hearth' }),
    h('p', { class: 'muted', text: 'Paste an API key. It is kept only in this browser tab and forgotten when you close it.' }),
    h('label', { class: 'field', for: 'api-key' }, h('span', { class: 'field-label', text: 'API key' }), key),
    h('div', { class: 'form-actions' }, submit),
    error,
  );
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const value = key.value.trim();
    if (!value) {
      setText(error, 'Enter an API key.');
      return;
    }
    submit.disabled = true;
    setText(error, '');
    try {
      await get('/v1/vms', { key: value });
      setKey(value);
      onSignedIn();
    } catch (e) {
      setText(error, e.status === 401 ? 'That key was not accepted.' : e.message);
      key.select();
    } finally {
      submit.disabled = false;
    }
  });
  replace(root, h('div', { class: 'signin-wrap' }, form));
  key.focus();
  return () => {};
}
