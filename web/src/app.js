// hearth web console: the app shell, sign-in state and hash routing.

import { getKey, setKey, setUnauthorizedHandler } from './api.js';
import { h, replace } from './dom.js';
import './expose.js';
import { mountSignIn } from './views/signin.js';
import { mountVms } from './views/vms.js';
import { mountVm } from './views/vm.js';
import { mountNetworks } from './views/networks.js';
import { mountImages } from './views/images.js';
import { mountDatabases } from './views/databases.js';
import { mountOperations } from './views/operations.js';

const ROUTES = [
  ['vms', 'VMs'],
  ['databases', 'Databases'],
  ['networks', 'Networks'],
  ['images', 'Images'],
  ['operations', 'Operations'],
];

const app = document.getElementById('app') || document.body.appendChild(h('div', { id: 'app' }));
let cleanup = () => {};

const navLinks = ROUTES.map(([route, label]) => h('a', { href: `#/${route}`, text: label, testid: `nav-${route}`, dataset: { route } }));
const signOut = h('a', { href: '#/vms', class: 'signout', text: 'Sign out', testid: 'sign-out', onclick: (ev) => {
  ev.preventDefault();
  setKey('');
  route();
} });
const header = h(
  'header',
  { class: 'topbar' },
  h('a', { class: 'brand', href: '#/vms' }, h('span', { class: 'brand-mark', 'aria-hidden': 'true' }), 'hearth'),
  h('nav', { class: 'nav', 'aria-label': 'Main' }, navLinks),
  signOut,
);
const main = h('main', { class: 'main', id: 'main' });

function parse(hash) {
  const parts = hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || 'vms', arg: parts[1] };
}

function route(notice = '') {
  cleanup();
  cleanup = () => {};
  window.scrollTo(0, 0);
  if (!getKey()) {
    header.hidden = true;
    replace(app, main);
    cleanup = mountSignIn(main, () => route(), notice);
    return;
  }
  header.hidden = false;
  if (header.parentNode !== app) replace(app, header, main);
  const { page, arg } = parse(location.hash);
  for (const a of navLinks) a.classList.toggle('active', a.dataset.route === page);
  main.replaceChildren();
  switch (page) {
    case 'vms':
      cleanup = arg ? mountVm(main, arg) : mountVms(main);
      break;
    case 'networks':
      cleanup = mountNetworks(main);
      break;
    case 'databases':
      cleanup = mountDatabases(main);
      break;
    case 'images':
      cleanup = mountImages(main);
      break;
    case 'operations':
      cleanup = mountOperations(main);
      break;
    default:
      location.replace('#/vms');
  }
}

setUnauthorizedHandler(() => {
  if (!getKey()) return;
  setKey('');
  route('The server no longer accepts your key. Sign in again.');
});

window.addEventListener('hashchange', () => route());
route();
