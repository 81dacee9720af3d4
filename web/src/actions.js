// VM lifecycle actions shared by the list and the VM page.

import { post, del, vmPath } from './api.js';
import { follow, notify } from './ops.js';

const BUSY = new Set(['creating', 'deleting', 'starting', 'stopping']);

/** Whether an action makes sense in a state (the server has the last word). */
export function allowed(action, state) {
  switch (action) {
    case 'start':
      return ['stopped', 'failed', 'missing', 'unknown'].includes(state);
    case 'stop':
      return !BUSY.has(state) && state !== 'stopped';
    case 'reboot':
      return state === 'running';
    case 'pause':
      return state === 'running';
    case 'resume':
      return state === 'paused';
    case 'delete':
      return state !== 'deleting';
    default:
      return true;
  }
}

/**
 * Runs an action on a VM; asks first for delete. Resolves to the final operation,
 * or null when the user cancelled or the request was refused (already shown).
 */
export async function runAction(vm, action, onUpdate) {
  if (action === 'delete' && !confirm(`Delete VM "${vm.name}"? Its disk is removed too.`)) return null;
  let accepted;
  try {
    accepted = action === 'delete' ? await del(vmPath(vm.id)) : await post(`${vmPath(vm.id)}/${action}`);
  } catch (e) {
    notify(`${action} ${vm.name}: ${e.message}`, 'bad');
    return null;
  }
  if (!accepted?.operation) return null;
  return follow(accepted.operation, `${action} ${vm.name}`, onUpdate);
}
