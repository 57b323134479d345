// Connection settings shared by the client page and the dashboard: the server URL (?url=, else localStorage,
// else this page's origin) and the API key (localStorage only: never from the URL, URLs are logged), and where
// the key may go: to the page's own origin, or to another origin only after the user confirmed it (asked once
// per origin and tab). A declined origin gets its requests without the key.
const TOKEN_KEY = 'da3.token';
const URL_KEY = 'da3.url';
const ANSWERS = 'da3.key-origins';

export function originOf(base) {
  try {
    return new URL(base, location.href).origin;
  } catch {
    return null;
  }
}

/** The key to send to `base` ('' = send none). */
export function keyFor(base, key) {
  if (!key) return '';
  const origin = originOf(base);
  if (!origin || origin === 'null') return '';
  if (origin === location.origin) return key;
  let answers = {};
  try {
    answers = JSON.parse(sessionStorage.getItem(ANSWERS) || '{}');
  } catch { /* a bad entry counts as no answer */ }
  if (!(origin in answers)) {
    answers[origin] = window.confirm(`Send your API key to ${origin}?\n\nThis page is served by ${location.origin}; `
      + 'only confirm if you trust that server with your key.');
    sessionStorage.setItem(ANSWERS, JSON.stringify(answers));
  }
  return answers[origin] === true ? key : '';
}

/** The server this page was served by (its directory, no trailing slash). */
export function defaultBase() {
  return new URL('.', location.href).href.replace(/\/$/, '');
}

/** The page's URL and key inputs, filled from storage and saved on change (then `onChange` runs). */
export class ConnectionSettings {
  constructor(urlInput, tokenInput, { onChange = null } = {}) {
    this.urlInput = urlInput;
    this.tokenInput = tokenInput;
    const q = new URLSearchParams(location.search);
    urlInput.placeholder = defaultBase();
    urlInput.value = q.get('url') || localStorage.getItem(URL_KEY) || '';
    tokenInput.value = localStorage.getItem(TOKEN_KEY) || '';
    for (const [input, storageKey] of [[urlInput, URL_KEY], [tokenInput, TOKEN_KEY]]) {
      input.addEventListener('change', () => {
        localStorage.setItem(storageKey, input.value.trim());
        if (onChange) onChange();
      });
    }
  }

  /** The server's base URL, no trailing slash. */
  get base() {
    return (this.urlInput.value.trim() || defaultBase()).replace(/\/$/, '');
  }

  /** The key for the current server ('' for another origin unless the user confirmed it). */
  get key() {
    return keyFor(this.base, this.tokenInput.value.trim());
  }

  authHeaders() {
    const key = this.key;
    return key ? { Authorization: `Bearer ${key}` } : {};
  }
}
