// Where the stored API key may go: to the page's own origin, or to another origin only after the user confirmed
// it (asked once per origin and tab). A declined origin gets its requests without the key.
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
