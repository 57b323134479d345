// Errors the server answered with its code (docs/WEBSOCKET_API.md, error codes); as clients/da3_client/errors.py.

export class ServerError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.detail = message; // the server's message without the code
  }
}

/** The ServerError of a failed HTTP answer (its JSON `error`, else the HTTP status). */
export async function errorFromResponse(r) {
  const body = await r.json().catch(() => ({}));
  const e = body.error || { code: `HTTP_${r.status}`, message: r.statusText };
  return new ServerError(e.code, e.message);
}
