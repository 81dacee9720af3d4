// The VM page's "Size and snapshots" card: resize (vCPUs and memory, hot-plugged while
// it runs within its room to grow; a restart only when asked) and snapshots (take one,
// with or without memory; restore; delete), each answered with the server's words.

import { get, post, del, patch, vmPath } from '../api.js';
import { h, replace, setText, fmtMemory, fmtTime, table, td } from '../dom.js';
import { follow, notify } from '../ops.js';

export function mountCare(card, id, onChange) {
  let vm = null;
  const status = h('p', { class: 'muted', role: 'status', testid: 'care-status' });

  // Resize.
  const vcpus = h('input', { type: 'number', min: 1, id: 'resize-vcpus', testid: 'resize-vcpus', class: 'input-small' });
  const memory = h('input', { type: 'number', min: 64, id: 'resize-memory', testid: 'resize-memory', class: 'input-small' });
  const restart = h('input', { type: 'checkbox', id: 'resize-restart', testid: 'resize-restart' });
  const room = h('span', { class: 'muted', testid: 'resize-room' });
  const resizeBtn = h('button', {
    class: 'btn',
    type: 'submit',
    text: 'Resize',
    testid: 'resize-submit',
  });
  const resizeForm = h(
    'form',
    {
      class: 'inline-form',
      onsubmit: async (ev) => {
        ev.preventDefault();
        if (!vm) return;
        const body = {};
        if (Number(vcpus.value) !== vm.vcpus) body.vcpus = Number(vcpus.value);
        if (Number(memory.value) !== vm.memory_mib) body.memory_mib = Number(memory.value);
        if (!Object.keys(body).length) return setText(status, 'Nothing to change.');
        resizeBtn.disabled = true;
        setText(status, restart.checked ? 'Resizing (restarting if it must)…' : 'Resizing…');
        try {
          const q = restart.checked ? '?restart=true' : '';
          const v = await patch(`${vmPath(vm.id)}${q}`, body);
          setText(status, `Now ${v.vcpus} vCPUs and ${fmtMemory(v.memory_mib)}.`);
          onChange();
        } catch (e) {
          const msg =
            e.code === 'restart_required'
              ? `This needs a restart: tick “restart if it must” and resize again. (${e.message.replace(/; ask again with \?restart=true.*$/, '')})`
              : e.message;
          setText(status, msg);
          notify(`resize ${vm.name}: ${msg}`, 'bad');
        } finally {
          resizeBtn.disabled = false;
        }
      },
    },
    h('label', { for: 'resize-vcpus', text: 'vCPUs' }),
    vcpus,
    h('label', { for: 'resize-memory', text: 'Memory (MiB)' }),
    memory,
    h('label', { class: 'check' }, restart, ' restart if it must'),
    resizeBtn,
    room,
  );

  // Snapshots.
  const snapName = h('input', { type: 'text', id: 'snapshot-name', testid: 'snapshot-name', placeholder: 'name', pattern: '[a-z0-9]([a-z0-9\\-]*[a-z0-9])?', required: true });
  const withMemory = h('input', { type: 'checkbox', id: 'snapshot-memory', testid: 'snapshot-memory' });
  const snapBtn = h('button', { class: 'btn', type: 'submit', text: 'Take snapshot', testid: 'snapshot-submit' });
  const snapForm = h(
    'form',
    {
      class: 'inline-form',
      onsubmit: async (ev) => {
        ev.preventDefault();
        if (!vm) return;
        snapBtn.disabled = true;
        const name = snapName.value.trim();
        try {
          const a = await post(`${vmPath(vm.id)}/snapshots`, { name, memory: withMemory.checked });
          snapName.value = '';
          refreshSnapshots();
          const op = await follow(a.operation, `snapshot ${vm.name}@${name}`, refreshSnapshots);
          setText(status, op?.status === 'succeeded' ? `Snapshot ${name} taken.` : `Snapshot ${name}: ${op?.error?.message || 'failed'}`);
        } catch (e) {
          setText(status, e.message);
          notify(`snapshot ${vm.name}: ${e.message}`, 'bad');
        } finally {
          snapBtn.disabled = false;
          refreshSnapshots();
          onChange();
        }
      },
    },
    h('label', { for: 'snapshot-name', text: 'Snapshot' }),
    snapName,
    h('label', { class: 'check' }, withMemory, ' with memory'),
    snapBtn,
  );
  const snapList = h('div', { testid: 'snapshots' });

  replace(
    card,
    h('h2', { class: 'sub', text: 'Size' }),
    resizeForm,
    h('h2', { class: 'sub', text: 'Snapshots' }),
    snapForm,
    snapList,
    status,
  );

  let listKey = '';
  async function refreshSnapshots() {
    if (!vm) return;
    let list;
    try {
      list = await get(`${vmPath(vm.id)}/snapshots`);
    } catch (e) {
      setText(status, `Could not list snapshots: ${e.message}`);
      return;
    }
    const key = JSON.stringify(list);
    if (key === listKey) return;
    listKey = key;
    if (!list.length) {
      replace(snapList, h('p', { class: 'muted', text: 'No snapshots.' }));
      return;
    }
    const { table: tbl, tbody } = table(['Name', 'State', 'Memory', 'Size', 'Taken', ''], 'snapshot-table');
    for (const s of list) {
      const restoreBtn = h('button', {
        class: 'btn btn-small',
        text: 'Restore',
        testid: `snapshot-restore-${s.name}`,
        disabled: s.state !== 'ready',
        onclick: async () => {
          if (!confirm(`Take ${vm.name} back to ${s.name}? What its disks held since is lost.`)) return;
          try {
            const a = await post(`${vmPath(vm.id)}/restore`, { snapshot: s.name });
            const op = await follow(a.operation, `restore ${vm.name}@${s.name}`, onChange);
            setText(status, op?.status === 'succeeded' ? `Restored to ${s.name}.` : `Restore: ${op?.error?.message || 'failed'}`);
          } catch (e) {
            notify(`restore ${vm.name}: ${e.message}`, 'bad');
          }
          onChange();
        },
      });
      const deleteBtn = h('button', {
        class: 'btn btn-small btn-danger',
        text: 'Delete',
        testid: `snapshot-delete-${s.name}`,
        disabled: s.state !== 'ready',
        onclick: async () => {
          if (!confirm(`Delete snapshot ${s.name}?`)) return;
          try {
            await del(`${vmPath(vm.id)}/snapshots/${encodeURIComponent(s.name)}`);
          } catch (e) {
            notify(`delete snapshot ${s.name}: ${e.message}`, 'bad');
          }
          refreshSnapshots();
        },
      });
      tbody.append(
        h(
          'tr',
          { testid: `snapshot-row-${s.name}` },
          td('Name', s.name),
          td('State', s.state),
          td('Memory', s.memory ? 'yes' : 'no'),
          td('Size', fmtMemory(Math.round(s.size_bytes / 1048576))),
          td('Taken', fmtTime(s.created_at_ms)),
          td('', restoreBtn, ' ', deleteBtn),
        ),
      );
    }
    replace(snapList, tbl);
  }

  return {
    /** The page's latest copy of the VM. */
    update(v) {
      const first = !vm;
      vm = v;
      if (!v) return;
      if (first || document.activeElement !== vcpus) vcpus.value = String(v.vcpus);
      if (first || document.activeElement !== memory) memory.value = String(v.memory_mib);
      vcpus.max = String(v.max_vcpus ?? v.vcpus);
      setText(room, `room to grow while it runs: ${v.max_vcpus ?? v.vcpus} vCPUs, ${fmtMemory(v.max_memory_mib ?? v.memory_mib)}`);
      snapForm.querySelector('button').disabled = false;
      withMemory.disabled = !['running', 'paused'].includes(v.state);
      if (withMemory.disabled) withMemory.checked = false;
      refreshSnapshots();
    },
  };
}
