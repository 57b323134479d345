// HTTP side of the browser client (as clients/da3_client/client.py): session creation and exports.
// `settings` is a ConnectionSettings (settings.js): the server URL and the key it may be sent.
import { errorFromResponse } from './errors.js';

export const EXPORTS = { ply: 'reconstruction.ply', glb: 'reconstruction.glb', trajectory: 'trajectory.json' };

/** POST /ws/session/create; resolves with the server's answer (session_id, params, ...); throws ServerError. */
export async function createSession(settings, params) {
  const r = await fetch(`${settings.base}/ws/session/create`, {
    method: 'POST', headers: { 'Content-Type': 'application/json', ...settings.authHeaders() },
    body: JSON.stringify(params),
  });
  if (!r.ok) throw await errorFromResponse(r);
  return r.json().catch(() => ({}));
}

/** GET one export ("ply", "glb" or "trajectory") as a Blob; throws ServerError. */
export async function fetchExport(settings, sessionId, kind) {
  const r = await fetch(`${settings.base}/ws/session/${sessionId}/${EXPORTS[kind]}`,
    { headers: settings.authHeaders() });
  if (!r.ok) throw await errorFromResponse(r);
  return r.blob();
}
