// `#/databases`: managed PostgreSQL: the list, a create form (the password is shown
// once, when the create is accepted), each database's URI, CA and server log.

import { get, post, del, getText } from '../api.js';
import { h, replace, setText, every, table, td, badge } from '../dom.js';
import { follow } from '../ops.js';

const dbPath = (name) => `/v1/databases/${encodeURIComponent(name)}`;

export function mountDatabases(root) {
  const banner = h('div', { class: 'banner banner-bad', hidden: true, role: 'alert' });
  const { table: tbl, tbody } = table(['Name', 'State', 'Version', 'Size', 'Connect', ''], 'database-table');
  const empty = h('p', { class: 'muted empty', hidden: true, text: 'No databases.' });
  const log = h('pre', { class: 'mono log', testid: 'database-log', hidden: true, tabindex: '0', 'aria-label': 'Server log' });
  const logTitle = h('h2', { text: '', hidden: true });

  const showLog = async (name) => {
    setText(logTitle, `Log of ${name}`);
    logTitle.hidden = false;
    log.hidden = false;
    setText(log, 'loading…');
    try {
      setText(log, await getText(`${dbPath(name)}/logs?lines=200`));
    } catch (e) {
      setText(log, `Could not read the log: ${e.message}`);
    }
  };

  const refresh = async () => {
    let dbs;
    try {
      dbs = await get('/v1/databases');
      banner.hidden = true;
    } catch (e) {
      setText(banner, `Could not load the databases: ${e.message}`);
      banner.hidden = false;
      return;
    }
    dbs = Array.isArray(dbs) ? dbs : [];
    empty.hidden = dbs.length > 0;
    tbl.hidden = dbs.length === 0;
    replace(
      tbody,
      dbs.map((d) => {
        const logBtn = h('button', { class: 'link', type: 'button', text: 'Log', testid: `database-log-${d.name}`, onclick: () => showLog(d.name) });
        const ca = h('a', { href: '#', text: 'CA', onclick: async (ev) => {
          ev.preventDefault();
          const pem = await getText(`${dbPath(d.name)}/ca.pem`);
          const url = URL.createObjectURL(new Blob([pem], { type: 'application/x-pem-file' }));
          const a = h('a', { href: url, download: `${d.name}-ca.pem` });
          a.click();
          URL.revokeObjectURL(url);
        } });
        const drop = h('button', { class: 'link danger', type: 'button', text: 'Delete', testid: `database-delete-${d.name}`, onclick: async () => {
          if (!confirm(`Delete database ${d.name} and its data volume?`)) return;
          const accepted = await del(dbPath(d.name));
          await follow(accepted.operation, `delete ${d.name}`, refresh);
          refresh();
        } });
        return h(
          'tr',
          { testid: `database-row-${d.name}` },
          td('Name', h('strong', { text: d.name })),
          td('State', badge(d.state)),
          td('Version', `PostgreSQL ${d.version}`),
          td('Size', `${d.vcpus} vCPU · ${d.memory_mib} MiB · ${Math.round(d.storage_bytes / 2 ** 30)} GiB`),
          td('Connect', h('span', { class: 'mono', text: d.uri || '—', testid: `database-uri-${d.name}` }), ' ', ca),
          td('', logBtn, ' ', drop),
        );
      }),
    );
  };
  const poller = every(5000, refresh);
  replace(
    root,
    h(
      'div',
      { class: 'split' },
      h('section', { class: 'card' }, h('div', { class: 'card-head' }, h('h1', { text: 'Databases' })), banner, empty, tbl, logTitle, log),
      createForm(refresh),
    ),
  );
  return () => poller.stop();
}

function createForm(refresh) {
  const field = (label, input, hint) => h('label', { class: 'field' }, h('span', { class: 'field-label', text: label }), input, hint && h('span', { class: 'hint', text: hint }));
  const name = h('input', { name: 'name', testid: 'db-create-name', required: true, autocomplete: 'off', autocapitalize: 'none', spellcheck: 'false', pattern: '[a-z0-9]([a-z0-9\\-]{0,58}[a-z0-9])?', title: 'lowercase letters, digits and -' });
  const storage = h('input', { name: 'storage', testid: 'db-create-storage', value: '10G', required: true });
  const memory = h('input', { name: 'memory', type: 'number', min: '512', step: '128', value: '1024', required: true, testid: 'db-create-memory', inputmode: 'numeric' });
  const network = h('input', { name: 'network', testid: 'db-create-network', value: 'default' });
  const postgis = h('input', { type: 'checkbox', name: 'postgis', testid: 'db-create-postgis' });
  const submit = h('button', { type: 'submit', class: 'btn btn-primary', text: 'Create database', testid: 'db-create-submit' });
  const status = h('div', { class: 'form-status', testid: 'db-create-status', 'aria-live': 'polite' });
  const secret = h('p', { class: 'secret mono', testid: 'db-create-password', hidden: true });
  const form = h(
    'form',
    { class: 'card create', testid: 'db-create-form' },
    h('div', { class: 'card-head' }, h('h2', { text: 'Create database' })),
    field('Name', name),
    h('div', { class: 'row2' }, field('Storage', storage, 'e.g. 10G'), field('Memory (MiB)', memory)),
    field('Network', network),
    h('label', { class: 'check' }, postgis, h('span', { text: 'PostGIS' })),
    h('div', { class: 'form-actions' }, submit),
    status,
    secret,
  );
  const show = (text, tone = 'info') => {
    setText(status, text);
    status.className = `form-status tone-text-${tone}`;
  };
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (!form.reportValidity()) return;
    const body = { name: name.value.trim(), storage: storage.value.trim(), memory_mib: Number(memory.value) || 1024, network: network.value.trim() || undefined };
    if (postgis.checked) body.extensions = ['postgis'];
    submit.disabled = true;
    show('Submitting…');
    try {
      const accepted = await post('/v1/databases', body);
      setText(secret, `Password for postgres (shown only now): ${accepted.database.password}`);
      secret.hidden = false;
      refresh();
      const op = await follow(accepted.operation, `create ${body.name}`, (o) => {
        show(`${body.name}: ${o.status}${o.progress ? ` — ${o.progress}` : ''}`, o.status === 'failed' ? 'bad' : o.status === 'succeeded' ? 'ok' : 'info');
        refresh();
      });
      if (op.status === 'failed') show(`${body.name}: ${op.error?.message || 'creation failed'}`, 'bad');
    } catch (e) {
      show(`create ${body.name}: ${e.message}`, 'bad');
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
