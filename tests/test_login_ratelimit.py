"""The login layer's rules without a Hub: the sliding-window limits, the admin rule per provider, the first admin,
and the allow-all default. (The limits through a real Hub, spoofed X-Forwarded-For included: test_login_local_e2e.)"""

from __future__ import annotations

import logging

import pytest
from jupyterhub.auth import Authenticator

from hub_extension.db import Database
from hub_extension.login import store
from hub_extension.login.local import LocalAccountsAuthenticator
from hub_extension.login.passwords import verify_password
from hub_extension.login.ratelimit import LoginLimits, RateLimited, SlidingWindow
from hub_extension.login.registration import RegistrationMixin


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_counts_the_last_window_only():
    clock = Clock()
    window = SlidingWindow(3, 60, clock=clock)
    for _ in range(3):
        assert window.retry_after("a") == 0
        window.hit("a")
        clock.now += 10
    assert window.retry_after("a") == 30  # the first hit (at 1000) leaves the window at 1060; now is 1030
    assert window.retry_after("b") == 0  # keys are independent
    clock.now = 1060.5
    assert window.retry_after("a") == 0
    window.hit("a")
    assert window.retry_after("a") == 10
    window.reset("a")
    assert window.retry_after("a") == 0


def test_sliding_window_memory_is_bounded():
    window = SlidingWindow(1, 60, max_keys=100)
    for i in range(1000):
        window.hit(f"10.0.{i // 256}.{i % 256}")
    assert len(window._events) == 100
    assert window.retry_after("10.0.3.231") > 0 and window.retry_after("10.0.0.0") == 0  # the oldest forgotten
    with pytest.raises(ValueError):
        SlidingWindow(0, 60)


def test_login_limits_per_address_and_per_account():
    clock = Clock()
    limits = LoginLimits(login_per_address=5, login_per_account=3, signup_per_address=3, signup_per_account=2,
                         invite_per_address=3, invite_per_code=2, window=600, clock=clock)
    for _ in range(3):
        limits.check_login("10.0.0.1", "ada")
        limits.record_login_failure("10.0.0.1", "ada")
    with pytest.raises(RateLimited, match="sign-in") as limited:
        limits.check_login("10.0.0.2", "ada")  # another address: the account's own limit holds
    assert 0 < limited.value.retry_after <= 600
    limits.check_login("10.0.0.1", "bob")  # another account from the same address: 3 of 5 used
    limits.record_login_failure("10.0.0.1", "bob")
    limits.record_login_failure("10.0.0.1", None)
    with pytest.raises(RateLimited):
        limits.check_login("10.0.0.1", "carol")  # the address's limit
    # Sign-ups: one name tried from many addresses, and many names from one address.
    limits.record_signup("10.0.0.1", "dora")
    limits.record_signup("10.0.0.2", "dora")
    with pytest.raises(RateLimited, match="sign-up"):
        limits.check_signup("10.0.0.3", "dora")
    limits.check_signup("10.0.0.1", "erin")
    limits.record_signup("10.0.0.1", "erin")
    limits.record_signup("10.0.0.1", "finn")
    with pytest.raises(RateLimited, match="sign-up"):
        limits.check_signup("10.0.0.1", "gail")
    # Invitations: one link from many addresses, and many links from one address; no code is kept.
    limits.record_invite("10.0.0.1", "code-one")
    limits.record_invite("10.0.0.2", "code-one")
    with pytest.raises(RateLimited, match="invitation"):
        limits.check_invite("10.0.0.3", "code-one")
    assert "code-one" not in repr(limits.invite_code._events)
    limits.check_invite("10.0.0.1", "code-two")
    limits.record_invite("10.0.0.1", "code-two")
    limits.record_invite("10.0.0.1", "code-three")
    with pytest.raises(RateLimited, match="invitation"):
        limits.check_invite("10.0.0.1", "code-four")
    clock.now += 601
    limits.check_login("10.0.0.1", "ada")
    limits.check_signup("10.0.0.3", "dora")
    limits.check_invite("10.0.0.3", "code-one")


class ProviderLogin(RegistrationMixin, Authenticator):
    """The mixin over a provider whose verified e-mails are in the auth model (as GitHub's and OIDC's are)."""

    provider = "oidc"

    def verified_emails(self, auth_model):
        return set(auth_model.get("verified", ()))


@pytest.fixture
def db_file(tmp_path):
    return f"sqlite:///{tmp_path / 'login.sqlite'}"


def test_admin_rule_for_providers_is_verified_email_only(db_file):
    login = ProviderLogin(admin_emails={"Boss@Example.org"}, service_db_url=db_file)
    assert login.is_admin(None, {"name": "boss", "verified": ["boss@example.org"]}) is True
    assert login.is_admin(None, {"name": "boss", "verified": []}) is False  # claimed but not verified
    assert login.is_admin(None, {"name": "admin"}) is False  # a name never makes an admin
    assert login.admin_names() == set()
    with pytest.raises(ValueError, match="admin_users must be empty"):
        ProviderLogin(admin_users={"admin"}, service_db_url=db_file)


def test_admin_rule_for_local_accounts_is_configured_names_only(db_file):
    login = LocalAccountsAuthenticator(admin_users={"root"}, admin_emails={"x@example.org"}, service_db_url=db_file)
    assert login.is_admin(None, {"name": "root"}) is True
    assert login.is_admin(None, {"name": "admin"}) is False
    assert login.is_admin(None, {"name": "x", "verified": ["x@example.org"]}) is False  # e-mails: never local


def test_allow_all_unless_the_provider_restricts(db_file):
    assert ProviderLogin(service_db_url=db_file).allow_all is True
    assert ProviderLogin(service_db_url=db_file, allowed_users={"ada"}).allow_all is False
    assert ProviderLogin(service_db_url=db_file, allow_all=False).allow_all is False


def test_first_admin_is_created_once_with_a_printed_password(db_file, caplog):
    caplog.set_level(logging.WARNING)
    login = LocalAccountsAuthenticator(bootstrap_admin="Boss", service_db_url=db_file)
    login.login_db.close()
    assert "boss" in login.admin_users
    printed = [r.getMessage() for r in caplog.records if "First admin" in r.getMessage()]
    assert len(printed) == 1
    password = printed[0].split("password:")[1].split()[0]
    db = Database(db_file, threads=1)
    try:
        assert verify_password(db.call(store.password_hash, "boss"), password)
        assert db.call(store.user_status, "boss") == "active"
        caplog.clear()
        again = LocalAccountsAuthenticator(bootstrap_admin="boss", bootstrap_admin_password="another long passphrase",
                                           service_db_url=db_file)
        again.login_db.close()
        assert not [r for r in caplog.records if "First admin" in r.getMessage()]  # exists: never again
        assert verify_password(db.call(store.password_hash, "boss"), password)  # nor replaced
    finally:
        db.close()
    with pytest.raises(Exception, match="common"):
        LocalAccountsAuthenticator(bootstrap_admin="root", bootstrap_admin_password="qwertyqwerty",
                                   service_db_url=db_file)
