"""Passwords of local accounts: argon2id hashes (argon2-cffi) and the password policy.

Hashing and verifying take tens of milliseconds of CPU on purpose: callers on an event loop run them on a thread
(`asyncio.to_thread`). A password is never logged, stored or returned; only its hash is kept.
"""

from __future__ import annotations

import functools
import secrets
import string
from pathlib import Path

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 12
MAX_LENGTH = 1024  # longer is refused before hashing (a hostile multi-megabyte "password" costs nothing then)
COMMON_PASSWORDS_FILE = Path(__file__).with_name("common-passwords.txt")
# argon2id with OWASP's recommended parameters (m=19 MiB, t=2, p=1): every sign-in hashes in the Hub process, so
# memory per concurrent sign-in stays small; stronger parameters later re-hash at each user's next sign-in.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16, type=Type.ID)


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    """Verified when there is no account, so a wrong name costs as long as a wrong password (no enumeration)."""
    return _hasher.hash(secrets.token_urlsafe(16))


class PasswordRejected(ValueError):
    """The password does not meet the policy; the message says why, for the person choosing it."""


def hash_password(password: str) -> str:
    """The argon2id hash (PHC string with its own salt and parameters) of a password that met the policy."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether `password` matches; with no hash (no such account) the same work is done and False returned."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        ok = _hasher.verify(password_hash or _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return ok and password_hash is not None


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with other parameters than today's (rehash at the next successful login)."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


@functools.lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    lines = COMMON_PASSWORDS_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().lower() for line in lines if line.strip() and not line.startswith("#"))


def check_policy(password: str, *, username: str = "", min_length: int = MIN_LENGTH) -> None:
    """Raise PasswordRejected unless `password` is long enough and not a common or guessable one.

    Refused: shorter than `min_length` characters; a common password (case-insensitive), also with digits or
    symbols added before or after it ("Password2024!"); the user name in it; fewer than 4 different characters.
    """
    if len(password) < min_length:
        raise PasswordRejected(f"The password must have at least {min_length} characters.")
    if len(password) > MAX_LENGTH:
        raise PasswordRejected(f"The password must have at most {MAX_LENGTH} characters.")
    lowered = password.lower()
    padding = string.digits + string.punctuation + " "
    common = common_passwords()
    if {lowered, lowered.strip(padding), lowered.rstrip(padding), lowered.lstrip(padding)} & common:
        raise PasswordRejected("This password is one of the most common passwords; choose another.")
    if username and len(username) >= 3 and username.lower() in lowered:
        raise PasswordRejected("The password must not contain the user name.")
    if len(set(password)) < 4:
        raise PasswordRejected("The password needs more different characters.")


def generate_password(length: int = 20) -> str:
    """A random password that meets the policy (for the first admin and admin resets)."""
    alphabet = string.ascii_letters + string.digits
    while True:
        candidate = "".join(secrets.choice(alphabet) for _ in range(length))
        try:
            check_policy(candidate)
        except PasswordRejected:
            continue
        return candidate
