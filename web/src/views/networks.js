// `#/networks`: the networks and what netd reports about them.

import { get } from '../api.js';
import { h, replace, setText, every, table, td, badge } from '../dom.js';

export function mountNetworks(root) {
  const banner = h('div', { class: 'banner banner-bad', hidden: true, role: 'alert' });
  const { table: tbl, tbody } = table(['Name', 'Subnet', 'Gateway', 'Bridge', 'DHCP', 'NAT', 'VXLAN', 'Ports'], 'network-table');
  const empty = h('p', { class: 'muted empty', hidden: true, text: 'No networks.' });
  replace(root, h('section', { class: 'card' }, h('div', { class: 'card-head' }, h('h1', { text: 'Networks' })), banner, empty, tbl));

  const poller = every(5000, async () => {
    let nets;
    try {
      nets = await get('/v1/networks');
      banner.hidden = true;
    } catch (e) {
      setText(banner, `Could not load the networks: ${e.message}`);
      banner.hidden = false;
      return;
    }
    nets = Array.isArray(nets) ? nets : [];
    empty.hidden = nets.length > 0;
    tbl.hidden = nets.length === 0;
    replace(
      tbody,
      nets.map((n) => {
        const s = n.spec || {};
        const ports = Array.isArray(n.ports) ? n.ports.length : n.ports ?? '';
        const vx = s.vxlan ? (typeof s.vxlan === 'object' ? Object.values(s.vxlan).join(' ') : String(s.vxlan)) : '—';
        return h(
          'tr',
          { testid: `network-row-${s.name}` },
          td('Name', h('strong', { text: s.name })),
          td('Subnet', h('span', { class: 'mono', text: s.subnet || '' })),
          td('Gateway', h('span', { class: 'mono', text: n.gateway || s.gateway || '' })),
          td('Bridge', h('span', { class: 'mono', text: n.bridge || '' }), ' ', badge(n.bridge_present ? 'present' : 'absent')),
          td('DHCP', s.dhcp ? `on${n.dhcp_pid ? ` (pid ${n.dhcp_pid})` : ''}` : 'off'),
          td('NAT', s.nat ? 'on' : 'off'),
          td('VXLAN', h('span', { class: 'mono', text: n.vxlan_device ? `${n.vxlan_device} ${vx}` : vx })),
          td('Ports', `${ports}${Array.isArray(n.allocated) ? ` · ${n.allocated.length} addresses` : ''}`),
        );
      }),
    );
  });
  return () => poller.stop();
}
