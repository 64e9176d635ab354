"""Sliding-window rate limits for login, sign-up and invite redemption, in the Hub process's memory.

One Hub process serves all logins, so an in-memory limit is exact there (a restart forgets it, which only gives
an attacker one more window). Memory is bounded: at most `max_keys` addresses or accounts are tracked, the
least recently seen forgotten first.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class SlidingWindow:
    """At most `limit` events per `window` seconds for each key (an address, an account name)."""

    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        if limit < 1 or window <= 0:
            raise ValueError("a rate limit needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def retry_after(self, key: str) -> int:
        """0 when one more event is allowed now, else the whole seconds until it will be."""
        now = self.clock()
        events = self._recent(key, now)
        if events is None or len(events) < self.limit:
            return 0
        return max(1, math.ceil(events[-self.limit] + self.window - now))

    def hit(self, key: str) -> None:
        """Record one event for `key`."""
        now = self.clock()
        events = self._recent(key, now)
        if events is None:
            events = self._events[key] = deque(maxlen=self.limit)
        events.append(now)
        self._events.move_to_end(key)
        while len(self._events) > self.max_keys:
            self._events.popitem(last=False)

    def reset(self, key: str) -> None:
        self._events.pop(key, None)


class RateLimited(Exception):
    """Too many attempts: `retry_after` seconds until the next one is allowed."""

    def __init__(self, what: str, retry_after: int):
        minutes = math.ceil(retry_after / 60)
        when = f"{retry_after} seconds" if retry_after < 120 else f"{minutes} minutes"
        super().__init__(f"Too many {what} attempts. Try again in {when}.")
        self.retry_after = retry_after


class LoginLimits:
    """The limits a login layer applies, each per client address and per account: failed sign-ins (per account
    name), sign-ups (per requested name) and invitation links opened or redeemed (per invitation, keyed by a hash
    of its code so no code is kept). `check_*` raise RateLimited before the work is done; `record_*` count after."""

    def __init__(self, *, login_per_address: int, login_per_account: int, signup_per_address: int,
                 signup_per_account: int, invite_per_address: int, invite_per_code: int, window: float,
                 clock: Callable[[], float] = time.monotonic):
        self.login_address = SlidingWindow(login_per_address, window, clock=clock)
        self.login_account = SlidingWindow(login_per_account, window, clock=clock)
        self.signup_address = SlidingWindow(signup_per_address, window, clock=clock)
        self.signup_account = SlidingWindow(signup_per_account, window, clock=clock)
        self.invite_address = SlidingWindow(invite_per_address, window, clock=clock)
        self.invite_code = SlidingWindow(invite_per_code, window, clock=clock)

    @staticmethod
    def _check(what: str, *checks: tuple[SlidingWindow, str | None]) -> None:
        wait = max((limiter.retry_after(key) for limiter, key in checks if key), default=0)
        if wait:
            raise RateLimited(what, wait)

    @staticmethod
    def _hit(*hits: tuple[SlidingWindow, str | None]) -> None:
        for limiter, key in hits:
            if key:
                limiter.hit(key)

    def check_login(self, address: str, account: str | None) -> None:
        self._check("sign-in", (self.login_address, address), (self.login_account, account))

    def record_login_failure(self, address: str, account: str | None) -> None:
        self._hit((self.login_address, address), (self.login_account, account))

    def check_signup(self, address: str, account: str | None) -> None:
        self._check("sign-up", (self.signup_address, address), (self.signup_account, account))

    def record_signup(self, address: str, account: str | None) -> None:
        self._hit((self.signup_address, address), (self.signup_account, account))

    def check_invite(self, address: str, code: str | None) -> None:
        self._check("invitation", (self.invite_address, address), (self.invite_code, _code_key(code)))

    def record_invite(self, address: str, code: str | None) -> None:
        self._hit((self.invite_address, address), (self.invite_code, _code_key(code)))


def _code_key(code: str | None) -> str | None:
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest() if code else None
