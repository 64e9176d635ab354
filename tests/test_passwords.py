"""Local account passwords: argon2id hashes and the password policy (no Hub, no database)."""

from __future__ import annotations

import pytest

from hub_extension.login.passwords import (
    MAX_LENGTH,
    PasswordRejected,
    check_policy,
    common_passwords,
    generate_password,
    hash_password,
    needs_rehash,
    verify_password,
)

GOOD = "correct horse battery staple"


@pytest.fixture(scope="module")
def hashed() -> str:
    return hash_password(GOOD)  # made once: hashing is slow on purpose


def test_hash_is_argon2id_salted_and_verifies(hashed):
    first, second = hashed, hash_password(GOOD)
    assert first.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert first != second  # a salt of its own each time
    assert GOOD not in first
    assert verify_password(first, GOOD)
    assert not verify_password(first, GOOD + " ")
    assert not verify_password(first, "")
    assert not needs_rehash(first)


def test_no_account_and_garbage_hashes_never_verify(hashed):
    assert not verify_password(None, GOOD)  # same work as a wrong password, still False
    assert not verify_password("not-a-hash", GOOD)
    assert not verify_password(hashed, "x" * (MAX_LENGTH + 1))
    assert needs_rehash("$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA")
    assert needs_rehash("garbage")


@pytest.mark.parametrize("password, why", [
    ("short-pass1", "at least 12"),
    ("qwertyuiop", "at least 12"),
    ("qwertyqwerty", "common"),  # a common password that is long enough
    ("1qaz2wsx3edc", "common"),
    ("Password2024!", "common"),  # a common one with digits and symbols added
    ("!!Sunshine12345", "common"),
    ("aaaaaaaaaaaaaaaa", "different characters"),
    ("abababababababab", "different characters"),
    ("my-name-alice-is-long", "user name"),
    ("x" * (MAX_LENGTH + 1), "at most"),
])
def test_policy_refuses(password, why):
    with pytest.raises(PasswordRejected, match=why):
        check_policy(password, username="alice")


def test_policy_accepts_long_uncommon_passwords():
    for password in (GOOD, "Tr0ub4dor&3-but-longer", "ünïcödé pässwörd 🙂"):
        check_policy(password, username="alice")
    with pytest.raises(PasswordRejected, match="at least 16"):
        check_policy("twelve-chars", min_length=16)


def test_common_list_ships_with_the_package():
    common = common_passwords()
    assert len(common) >= 4000
    assert {"123456", "password", "qwerty"} <= common
    assert not any(p.startswith("#") for p in common)


def test_generated_passwords_meet_the_policy():
    passwords = {generate_password() for _ in range(20)}
    assert len(passwords) == 20
    for password in passwords:
        check_policy(password)
        assert len(password) == 20
