"""Where an API key is generated and its format checked (no database here).

A key reads `jhi_<43 base62 chars: 256 bits of randomness><6 base62 chars: CRC32 of the random part>`.
The prefix makes a leaked key recognisable to secret scanners; the checksum lets us refuse a mistyped or
made-up key before touching the database (as GitHub's tokens do). Only the SHA-256 of the whole key is
stored: the key carries 256 bits of entropy, so one round of a fast hash is enough.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib

PREFIX = "jhi_"
ALPHABET = string.digits + string.ascii_letters  # base62
RANDOM_CHARS = 43  # 62**43 > 2**256
CHECKSUM_CHARS = 6  # 62**6 > 2**32
KEY_LENGTH = len(PREFIX) + RANDOM_CHARS + CHECKSUM_CHARS
DISPLAY_CHARS = 8  # random characters shown in lists: `jhi_AbCd1234…`
_ALLOWED = frozenset(ALPHABET)


def _base62(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        out.append(ALPHABET[rem])
    return "".join(reversed(out))


def _checksum(random_part: str) -> str:
    return _base62(zlib.crc32(random_part.encode("ascii")), CHECKSUM_CHARS)


def generate() -> str:
    """A new secret key. Shown to its owner once; never stored or logged."""
    random_part = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    return PREFIX + random_part + _checksum(random_part)


def looks_like_key(value: str) -> bool:
    """True for anything that claims to be one of our keys (right prefix), valid or not."""
    return value.startswith(PREFIX)


def is_well_formed(key: str) -> bool:
    """Prefix, length, alphabet and checksum: the checks that need no database."""
    if len(key) != KEY_LENGTH or not key.startswith(PREFIX):
        return False
    body = key[len(PREFIX) :]
    if not _ALLOWED.issuperset(body):
        return False
    random_part, checksum = body[:RANDOM_CHARS], body[RANDOM_CHARS:]
    return secrets.compare_digest(_checksum(random_part), checksum)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def display_prefix(key: str) -> str:
    return key[: len(PREFIX) + DISPLAY_CHARS]
