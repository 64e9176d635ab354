"""Login and registration on the Hub (runs inside the Hub process; never imports the engine).

- `registration.py`: `RegistrationMixin`, the one registration policy (open / approval / invite), admin rule and
  login rate limits for every provider; the invite and "waiting for approval" pages.
- `local.py`: `LocalAccountsAuthenticator`: sign-up, sign-in, change password (argon2id, `passwords.py`).
- `providers.py`: GitHub and any OIDC provider, with the same mixin.
- `store.py`: users' status rows, local accounts and invites in the service's database (shared with the service).
- `passwords.py`, `ratelimit.py`, `pages.py` (the Hub's templates, extended by `templates/`).
"""
