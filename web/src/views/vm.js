// `#/vms/<id>`: one VM's details, actions, serial console and VNC screen.

import { get, vmPath } from '../api.js';
import { h, replace, setText, badge, updateBadge, every, fmtMemory, fmtTime, table, td } from '../dom.js';
import { allowed, runAction } from '../actions.js';
import { SerialConsole } from '../serial.js';
import { VncScreen } from '../vnc.js';
import { mountCare } from './vm-care.js';

const NO_DISPLAY =
  'This VM has no display (Cloud Hypervisor VMs have none; QEMU VMs need vnc: true) — use the serial console.';

export function mountVm(root, id) {
  let vm = null;
  let prevState = null;
  let gone = false;
  let serial = null;
  let vnc = null;
  let tab = 'serial';

  // Header and actions.
  const title = h('h1', { text: id });
  const state = badge('unknown', 'vm-page-state');
  const reason = h('span', { class: 'reason muted' });
  const banner = h('div', { class: 'banner banner-bad', hidden: true, role: 'alert' });
  const action = (name, label, cls = '') =>
    h('button', {
      class: `btn ${cls}`,
      text: label,
      testid: `vm-${name}`,
      disabled: true,
      onclick: async (ev) => {
        if (!vm) return;
        ev.currentTarget.disabled = true;
        const op = await runAction(vm, name, () => poller.now());
        if (name === 'delete' && op && op.status !== 'failed') location.hash = '#/vms';
        else if (name === 'delete' && op === null) refreshButtons();
        poller.now();
      },
    });
  const buttons = {
    start: action('start', 'Start', 'btn-primary'),
    stop: action('stop', 'Stop'),
    reboot: action('reboot', 'Reboot'),
    pause: action('pause', 'Pause'),
    resume: action('resume', 'Resume'),
    delete: action('delete', 'Delete', 'btn-danger'),
  };

  // Details.
  const dl = h('dl', { class: 'details' });
  const careCard = h('section', { class: 'card', testid: 'vm-care' });
  const nicsBox = h('div');

  // Console tabs.
  const serialStatus = h('span', { class: 'console-status muted', testid: 'console-status' });
  const serialReconnect = h('button', { class: 'btn btn-small', text: 'Reconnect', hidden: true, testid: 'console-reconnect', onclick: () => serial?.reconnect() });
  const consoleEl = h('div', { class: 'terminal', testid: 'console' });
  const serialPanel = h('div', { class: 'panel', role: 'tabpanel' }, h('div', { class: 'console-bar' }, serialStatus, serialReconnect), consoleEl);

  const vncStatus = h('span', { class: 'console-status muted', testid: 'vnc-status' });
  const vncReconnect = h('button', { class: 'btn btn-small', text: 'Reconnect', hidden: true, testid: 'vnc-reconnect', onclick: () => vnc?.connect() });
  const vncCad = h('button', { class: 'btn btn-small', text: 'Ctrl+Alt+Del', hidden: true, onclick: () => vnc?.sendCtrlAltDel() });
  const vncEl = h('div', { class: 'vnc', testid: 'vnc' });
  const vncNote = h('p', { class: 'note', hidden: true, testid: 'vnc-none', text: NO_DISPLAY });
  const vncPanel = h('div', { class: 'panel', role: 'tabpanel', hidden: true }, h('div', { class: 'console-bar' }, vncStatus, vncCad, vncReconnect), vncNote, vncEl);

  const tabSerial = h('button', { class: 'tab', role: 'tab', text: 'Serial console', testid: 'tab-serial', onclick: () => showTab('serial', true) });
  const tabVnc = h('button', { class: 'tab', role: 'tab', text: 'VNC screen', testid: 'tab-vnc', onclick: () => showTab('vnc') });

  replace(
    root,
    h('p', { class: 'crumbs' }, h('a', { href: '#/vms', text: '← VMs' })),
    h(
      'section',
      { class: 'card' },
      h('div', { class: 'card-head vm-head' }, h('div', { class: 'vm-title' }, title, state), reason),
      banner,
      h('div', { class: 'actions vm-actions' }, Object.values(buttons)),
      dl,
      nicsBox,
    ),
    h('section', { class: 'card console-card' }, h('div', { class: 'tabs', role: 'tablist' }, tabSerial, tabVnc), serialPanel, vncPanel),
    careCard,
  );
  const care = mountCare(careCard, id, () => poller.now());

  serial = new SerialConsole(consoleEl, id, (st, msg) => {
    setText(serialStatus, msg);
    serialReconnect.hidden = !(st === 'closed' || st === 'error' || (st === 'connected' && !serial?.writable));
  });
  setText(serialStatus, 'Waiting for the VM…');
  showTab('serial');

  function showTab(which, focus = false) {
    tab = which;
    tabSerial.setAttribute('aria-selected', String(which === 'serial'));
    tabVnc.setAttribute('aria-selected', String(which === 'vnc'));
    serialPanel.hidden = which !== 'serial';
    vncPanel.hidden = which !== 'vnc';
    if (which === 'serial') {
      serial.fit();
      if (focus) serial.focus();
    } else {
      updateVnc();
      vnc?.refit();
    }
  }

  const hasDisplay = () => vm && vm.hypervisor === 'qemu' && vm.vnc;

  function updateVnc() {
    if (!vm) return;
    vncNote.hidden = hasDisplay();
    vncEl.hidden = !hasDisplay();
    if (!hasDisplay()) {
      setText(vncStatus, '');
      vncReconnect.hidden = true;
      return;
    }
    if (!vnc) {
      vnc = new VncScreen(vncEl, vm.id, (st, msg) => {
        setText(vncStatus, msg);
        vncReconnect.hidden = !(st === 'closed' || st === 'error');
        vncCad.hidden = st !== 'connected';
      });
    }
    if (tab === 'vnc' && vm.state === 'running' && vnc.state === 'idle') vnc.connect();
    else if (tab === 'vnc' && vm.state !== 'running' && !vnc.connected) {
      setText(vncStatus, `The VM is ${vm.state}; the screen connects when it is running.`);
    }
  }

  function refreshButtons() {
    for (const [name, btn] of Object.entries(buttons)) btn.disabled = !vm || !allowed(name, vm.state);
    buttons.pause.hidden = vm?.state === 'paused';
    buttons.resume.hidden = vm?.state !== 'paused';
  }

  function render() {
    setText(title, vm.name);
    document.title = `${vm.name} · hearth`;
    updateBadge(state, vm.state);
    setText(reason, vm.reason || '');
    refreshButtons();
    care.update(vm);
    const rows = [
      ['State', vm.state],
      ['Hypervisor', vm.hypervisor],
      ['vCPUs', `${vm.vcpus} (room for ${vm.max_vcpus ?? vm.vcpus})`],
      ['Memory', fmtMemory(vm.memory_mib)],
      ['Image', vm.image],
      ['Display', vm.hypervisor === 'qemu' && vm.vnc ? 'VNC' : 'none'],
      ['Project', vm.project],
      ['PID', vm.pid ?? '—'],
      ['Created', fmtTime(vm.created_at_ms)],
      ['ID', vm.id],
    ];
    replace(dl, rows.map(([k, v]) => h('div', { class: 'detail' }, h('dt', { text: k }), h('dd', { text: String(v ?? '') }))));
    renderNics();
  }

  let nicsKey = '';
  function renderNics() {
    const key = JSON.stringify(vm.nics || []);
    if (key === nicsKey) return;
    nicsKey = key;
    if (!vm.nics?.length) {
      replace(nicsBox, h('p', { class: 'muted', text: 'No network interfaces.' }));
      return;
    }
    const { table: tbl, tbody } = table(['Network', 'IP address', 'Gateway', 'MAC', 'Config'], 'vm-nics');
    for (const n of vm.nics) {
      tbody.append(
        h('tr', {}, td('Network', n.network), td('IP address', h('span', { class: 'mono', text: `${n.ip}/${n.prefix}` })), td('Gateway', h('span', { class: 'mono', text: n.gateway })), td('MAC', h('span', { class: 'mono', text: n.mac })), td('Config', n.dhcp ? 'DHCP' : 'static')),
      );
    }
    replace(nicsBox, h('h2', { class: 'sub', text: 'Network interfaces' }), tbl);
  }

  const poller = every(2000, async () => {
    if (gone) return;
    try {
      vm = await get(vmPath(id));
      banner.hidden = true;
    } catch (e) {
      if (e.status === 404) {
        gone = true;
        setText(banner, 'This VM does not exist (any more).');
        banner.hidden = false;
        updateBadge(state, 'deleted');
        vm = null;
        refreshButtons();
        serial.disconnect();
        vnc?.disconnect();
        return;
      }
      setText(banner, `Could not load the VM: ${e.message}`);
      banner.hidden = false;
      return;
    }
    render();
    // The serial console connects by itself when the VM is (or becomes) running.
    const running = vm.state === 'running';
    if (running && prevState !== 'running' && !serial.connected) serial.connect();
    if (!running && !serial.connected) {
      setText(serialStatus, `The VM is ${vm.state}; the console connects when it is running.`);
      serialReconnect.hidden = true;
    }
    if (running && prevState !== 'running' && vnc && !vnc.connected && tab === 'vnc') vnc.connect();
    prevState = vm.state;
    updateVnc();
  });

  return () => {
    poller.stop();
    serial.dispose();
    vnc?.dispose();
    document.title = 'hearth';
  };
}
