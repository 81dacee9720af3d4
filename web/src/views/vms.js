// `#/vms`: the VM list (polled every 2 s) and the create form.

import { get, post } from '../api.js';
import { h, replace, setText, badge, updateBadge, every, table, td, vmIps } from '../dom.js';
import { allowed, runAction } from '../actions.js';
import { follow } from '../ops.js';

export function mountVms(root) {
  const banner = h('div', { class: 'banner banner-bad', hidden: true, role: 'alert' });
  const empty = h('p', { class: 'muted empty', hidden: true, text: 'No VMs yet. Create one with the form.' });
  const { table: tbl, tbody } = table(['Name', 'State', 'Hypervisor', 'IP addresses', ''], 'vm-table');
  const rows = new Map();
  let lastVms = [];

  const poller = every(2000, async () => {
    try {
      const vms = await get('/v1/vms');
      lastVms = Array.isArray(vms) ? vms : [];
      banner.hidden = true;
      render(lastVms);
    } catch (e) {
      setText(banner, `Could not load the VMs: ${e.message}`);
      banner.hidden = false;
    }
  });

  function render(vms) {
    vms = [...vms].sort((a, b) => a.name.localeCompare(b.name));
    const seen = new Set();
    for (const vm of vms) {
      seen.add(vm.id);
      let row = rows.get(vm.id);
      if (!row) {
        row = makeRow(vm);
        rows.set(vm.id, row);
      }
      updateRow(row, vm);
    }
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    // Keep DOM order = sorted order without re-creating rows.
    vms.forEach((vm, i) => {
      const tr = rows.get(vm.id).tr;
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
    empty.hidden = vms.length > 0;
    tbl.hidden = vms.length === 0;
  }

  function makeRow(vm) {
    const row = { vm };
    const act = (action, label, cls = '') =>
      h('button', {
        class: `btn btn-small ${cls}`,
        text: label,
        testid: `row-${action}`,
        onclick: async (ev) => {
          ev.currentTarget.disabled = true;
          await runAction(row.vm, action, () => poller.now());
          poller.now();
        },
      });
    row.link = h('a', { class: 'vm-name' });
    row.state = badge(vm.state, 'vm-state');
    row.reason = h('div', { class: 'reason muted' });
    row.hv = h('span');
    row.ips = h('span', { class: 'mono' });
    row.buttons = {
      start: act('start', 'Start'),
      stop: act('stop', 'Stop'),
      delete: act('delete', 'Delete', 'btn-danger'),
    };
    row.tr = h(
      'tr',
      { testid: `vm-row-${vm.name}` },
      td('Name', row.link),
      td('State', row.state, row.reason),
      td('Hypervisor', row.hv),
      td('IP addresses', row.ips),
      h('td', { class: 'actions' }, Object.values(row.buttons)),
    );
    return row;
  }

  function updateRow(row, vm) {
    row.vm = vm;
    setText(row.link, vm.name);
    const href = `#/vms/${encodeURIComponent(vm.id)}`;
    if (row.link.getAttribute('href') !== href) row.link.setAttribute('href', href);
    updateBadge(row.state, vm.state);
    setText(row.reason, vm.reason || '');
    setText(row.hv, vm.hypervisor + (vm.vnc ? ' · display' : ''));
    setText(row.ips, vmIps(vm) || '—');
    for (const [action, btn] of Object.entries(row.buttons)) btn.disabled = !allowed(action, vm.state);
  }

  const form = createForm(() => poller.now());

  replace(
    root,
    h(
      'div',
      { class: 'split' },
      h('section', { class: 'card' }, h('div', { class: 'card-head' }, h('h1', { text: 'Virtual machines' })), banner, empty, tbl),
      form,
    ),
  );
  tbl.hidden = true;

  return () => poller.stop();
}

function createForm(refresh) {
  const field = (label, input, hint) => h('label', { class: 'field' }, h('span', { class: 'field-label', text: label }), input, hint && h('span', { class: 'hint', text: hint }));

  const name = h('input', { name: 'name', testid: 'create-name', autocomplete: 'off', autocapitalize: 'none', spellcheck: 'false', placeholder: 'generated when empty', pattern: '[a-z0-9]([a-z0-9\\-]{0,61}[a-z0-9])?', title: 'lowercase letters, digits and -' });
  const image = h('select', { name: 'image', testid: 'create-image', required: true }, h('option', { value: '', text: 'loading…' }));
  const vcpus = h('input', { name: 'vcpus', type: 'number', min: '1', max: '64', step: '1', value: '1', required: true, testid: 'create-vcpus', inputmode: 'numeric' });
  const memory = h('input', { name: 'memory', type: 'number', min: '32', step: '1', value: '256', required: true, testid: 'create-memory', inputmode: 'numeric' });
  const hypervisor = h('select', { name: 'hypervisor', testid: 'create-hypervisor' }, h('option', { value: 'qemu', text: 'QEMU' }), h('option', { value: 'cloud-hypervisor', text: 'Cloud Hypervisor' }));
  const vnc = h('input', { type: 'checkbox', name: 'vnc', testid: 'create-vnc' });
  const network = h('select', { name: 'network', testid: 'create-network' }, h('option', { value: '', text: 'none' }));
  const submit = h('button', { type: 'submit', class: 'btn btn-primary', text: 'Create VM', testid: 'create-submit' });
  const status = h('div', { class: 'form-status', testid: 'create-status', 'aria-live': 'polite' });

  const syncVnc = () => {
    const qemu = hypervisor.value === 'qemu';
    vnc.disabled = !qemu;
    if (!qemu) vnc.checked = false;
  };
  hypervisor.addEventListener('change', syncVnc);
  syncVnc();

  // Fill the selects; failures leave a note but the form stays usable.
  // `data-loaded` marks a select as filled (tests wait for it).
  let networkTouched = false;
  network.addEventListener('change', () => (networkTouched = true));
  get('/v1/images')
    .then((images) => {
      const names = [...new Set((images || []).map((i) => (i.tag && i.tag !== 'latest' ? `${i.name}:${i.tag}` : i.name)))].sort();
      replace(image, names.length ? names.map((n) => h('option', { value: n, text: n })) : h('option', { value: '', text: 'no images' }));
    })
    .catch((e) => replace(image, h('option', { value: '', text: `cannot list images: ${e.message}` })))
    .finally(() => (image.dataset.loaded = 'true'));
  get('/v1/networks')
    .then((nets) => {
      const names = (nets || []).map((n) => n.spec?.name || n.name).filter(Boolean).sort();
      const chosen = network.value;
      replace(network, h('option', { value: '', text: 'none' }), names.map((n) => h('option', { value: n, text: n })));
      if (networkTouched) network.value = chosen;
      else if (names.includes('default')) network.value = 'default';
    })
    .catch(() => {})
    .finally(() => (network.dataset.loaded = 'true'));

  const form = h(
    'form',
    { class: 'card create', testid: 'create-form', novalidate: false },
    h('div', { class: 'card-head' }, h('h2', { text: 'Create VM' })),
    field('Name', name),
    field('Image', image),
    h('div', { class: 'row2' }, field('vCPUs', vcpus), field('Memory (MiB)', memory)),
    field('Hypervisor', hypervisor),
    h('label', { class: 'check' }, vnc, h('span', { text: 'VNC display' }), h('span', { class: 'hint', text: 'QEMU only' })),
    field('Network', network),
    h('div', { class: 'form-actions' }, submit),
    status,
  );

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (!form.reportValidity()) return;
    const body = {
      image: image.value,
      vcpus: Number(vcpus.value) || 1,
      memory_mib: Number(memory.value) || 256,
      hypervisor: hypervisor.value,
      nics: network.value ? [{ network: network.value }] : [],
      start: true,
    };
    if (name.value.trim()) body.name = name.value.trim();
    if (hypervisor.value === 'qemu' && vnc.checked) body.vnc = true;
    if (!body.image) {
      showStatus('Pick an image.', 'bad');
      return;
    }
    submit.disabled = true;
    showStatus('Submitting…');
    const label = `create ${body.name || 'VM'}`;
    try {
      const accepted = await post('/v1/vms', body);
      name.value = '';
      refresh();
      const vmName = accepted.vm?.name || body.name || 'VM';
      const op = await follow(accepted.operation, `create ${vmName}`, (o) => {
        showStatus(`${vmName}: ${o.status}${o.progress ? ` — ${o.progress}` : ''}`, o.status === 'failed' ? 'bad' : o.status === 'succeeded' ? 'ok' : 'info');
        refresh();
      });
      if (op.status === 'failed') showStatus(`${vmName}: ${op.error?.message || 'creation failed'}`, 'bad');
    } catch (e) {
      showStatus(`${label}: ${e.message}`, 'bad');
    } finally {
      submit.disabled = false;
    }
  });

  function showStatus(text, tone = 'info') {
    setText(status, text);
    status.className = `form-status tone-text-${tone}`;
  }

  return form;
}
