// `#/operations`: recent long-running operations, newest first.

import { get } from '../api.js';
import { h, replace, setText, every, table, td, badge, fmtTime } from '../dom.js';

export function mountOperations(root) {
  const banner = h('div', { class: 'banner banner-bad', hidden: true, role: 'alert' });
  const { table: tbl, tbody } = table(['Kind', 'Target', 'Status', 'Progress', 'Updated'], 'operation-table');
  const empty = h('p', { class: 'muted empty', hidden: true, text: 'No operations yet.' });
  replace(root, h('section', { class: 'card' }, h('div', { class: 'card-head' }, h('h1', { text: 'Operations' })), banner, empty, tbl));

  // VM names for the Target column (operations only carry the id).
  const names = new Map();
  const refreshNames = () =>
    get('/v1/vms')
      .then((vms) => (vms || []).forEach((vm) => names.set(vm.id, vm.name)))
      .catch(() => {});

  const poller = every(3000, async () => {
    let ops;
    try {
      [ops] = await Promise.all([get('/v1/operations'), refreshNames()]);
      banner.hidden = true;
    } catch (e) {
      setText(banner, `Could not load the operations: ${e.message}`);
      banner.hidden = false;
      return;
    }
    ops = (Array.isArray(ops) ? ops : []).sort((a, b) => (b.created_at_ms || 0) - (a.created_at_ms || 0));
    empty.hidden = ops.length > 0;
    tbl.hidden = ops.length === 0;
    replace(
      tbody,
      ops.slice(0, 200).map((o) =>
        h(
          'tr',
          { testid: `op-row-${o.id}`, title: o.id },
          td('Kind', h('span', { class: 'mono', text: o.kind })),
          td('Target', o.target_kind === 'vm' ? names.has(o.target_id) ? h('a', { href: `#/vms/${encodeURIComponent(o.target_id)}`, text: names.get(o.target_id) }) : h('span', { class: 'mono', text: o.target_id }) : h('span', { class: 'mono', text: `${o.target_kind}/${o.target_id}` })),
          td('Status', badge(o.status)),
          td('Progress', o.status === 'failed' && o.error ? h('span', { class: 'tone-text-bad', text: o.error.message }) : o.progress || ''),
          td('Updated', fmtTime(o.updated_at_ms)),
        ),
      ),
    );
  });
  return () => poller.stop();
}
