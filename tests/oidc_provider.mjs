// A real OpenID Connect provider on loopback for the login tests (npm `oidc-provider`).
//
//   node tests/oidc_provider.mjs <port> <setup.json>
//
// setup.json: {"client": {"client_id", "client_secret", "redirect_uris": [...]},
//              "users": {"<login>": {"password": "...", "claims": {"email", "email_verified", "groups", ...}}}}
// The issuer is http://127.0.0.1:<port>. One static client (code flow, client_secret_basic or _post), a login
// page of our own (/interaction/<uid>: login + password, consent granted with the login, as a company's
// provider does for its own applications). Prints "listening <issuer>" once ready; stops on SIGTERM.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const { default: Provider } = await import(
  pathToFileURL(join(here, '..', '.node', 'node_modules', 'oidc-provider', 'lib', 'index.js')).href
);

const port = Number(process.argv[2]);
const setup = JSON.parse(readFileSync(process.argv[3], 'utf8'));
const issuer = `http://127.0.0.1:${port}`;
const users = setup.users;

const provider = new Provider(issuer, {
  clients: [{
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...setup.client,
  }],
  // Plain-http loopback issuer: test-only cookie keys, no `secure` cookies.
  cookies: { keys: ['oidc-provider-test-cookie-key'], long: { secure: false }, short: { secure: false } },
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  pkce: { required: () => false },
  scopes: ['openid', 'email', 'profile', 'groups', 'offline_access'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username', 'name'],
    groups: ['groups'],
  },
  // Userinfo carries every claim the granted scopes name (not only those in the ID token).
  conformIdTokenClaims: false,
  async findAccount(ctx, id) {
    const user = users[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, ...user.claims };
      },
    };
  },
});
provider.proxy = false;

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginPage(uid, message) {
  return `<!doctype html><html><head><title>Test provider sign-in</title></head><body>
<h1>Test provider</h1>${message ? `<p class="error">${escape(message)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}">
<input name="login" id="login" autofocus> <input name="password" id="password" type="password">
<button type="submit" id="submit">Sign in</button></form></body></html>`;
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 10000) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

// The login (and consent) step: the provider's own interaction, handled before the provider's routes.
async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  if (req.method === 'GET') {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
    res.end(loginPage(uid));
    return;
  }
  const form = await readForm(req);
  const login = form.get('login') || '';
  const user = Object.hasOwn(users, login) ? users[login] : undefined;
  if (!user || user.password !== form.get('password')) {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
    res.end(loginPage(uid, 'Wrong login or password.'));
    return;
  }
  const grant = new provider.Grant({ accountId: login, clientId: details.params.client_id });
  grant.addOIDCScope(details.params.scope);
  const result = { login: { accountId: login }, consent: { grantId: await grant.save() } };
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
}

const handle = provider.callback();
const server = createServer((req, res) => {
  const match = /^\/interaction\/([\w-]+)$/.exec(new URL(req.url, issuer).pathname);
  if (!match) {
    handle(req, res);
    return;
  }
  interaction(req, res, match[1]).catch((err) => {
    res.writeHead(400, { 'Content-Type': 'text/plain' });
    res.end(`interaction failed: ${err.message}`);
  });
});
server.listen(port, '127.0.0.1', () => console.log(`listening ${issuer}`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
process.on('SIGINT', () => server.close(() => process.exit(0)));
