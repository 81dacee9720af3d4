// `#/images`: the images VMs can be created from.

import { get } from '../api.js';
import { h, replace, setText, table, td, summarize } from '../dom.js';

export function mountImages(root) {
  const banner = h('div', { class: 'banner banner-bad', hidden: true, role: 'alert' });
  const { table: tbl, tbody } = table(['Name', 'Digest', 'Disk', 'Used by', 'Boot'], 'image-table');
  const empty = h('p', { class: 'muted empty', hidden: true, text: 'No images.' });
  replace(root, h('section', { class: 'card' }, h('div', { class: 'card-head' }, h('h1', { text: 'Images' })), banner, empty, tbl));
  let live = true;
  get('/v1/images')
    .then((images) => {
      if (!live) return;
      images = Array.isArray(images) ? images : [];
      empty.hidden = images.length > 0;
      tbl.hidden = images.length === 0;
      replace(
        tbody,
        images.map((i) => {
          const name = i.tag && i.tag !== 'latest' ? `${i.name}:${i.tag}` : i.name;
          const digest = i.catalog_only ? 'imported on first use' : (i.digest || '').replace('sha256:', '').slice(0, 12);
          const disk = i.disk ? `${(i.disk.virtual_size / 2 ** 30).toFixed(1)} GiB (from ${i.disk.source_format})` : 'none';
          const users = (i.in_use_by || []).length;
          return h(
            'tr',
            { testid: `image-row-${name}` },
            td('Name', h('strong', { text: name })),
            td('Digest', h('span', { class: 'small mono', text: digest })),
            td('Disk', h('span', { class: 'small', text: disk })),
            td('Used by', h('span', { class: 'small', text: `${users} VM${users === 1 ? '' : 's'}` })),
            td('Boot', h('span', { class: 'small', text: summarize({ cmdline: i.boot?.cmdline }) })),
          );
        }),
      );
    })
    .catch((e) => {
      setText(banner, `Could not load the images: ${e.message}`);
      banner.hidden = false;
    });
  return () => {
    live = false;
  };
}
