// `#/images`: the images VMs can be created from.

import { get } from '../api.js';
import { h, replace, setText, table, td, summarize } from '../dom.js';

export function mountImages(root) {
  const banner = h('div', { class: 'banner banner-bad', hidden: true, role: 'alert' });
  const { table: tbl, tbody } = table(['Name', 'Boot', 'Metadata'], 'image-table');
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
        images.map((i) =>
          h('tr', { testid: `image-row-${i.name}` }, td('Name', h('strong', { text: i.name })), td('Boot', h('span', { class: 'small', text: summarize(i.boot) })), td('Metadata', h('span', { class: 'small', text: summarize(i.metadata) }))),
        ),
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
