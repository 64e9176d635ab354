"""Client addresses: forwarding headers count only when the peer is a trusted proxy."""

import pytest

from hub_extension.net import client_ip, parse_networks

PROXIES = parse_networks(["127.0.0.1", "::1", "10.0.0.0/8"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("198.51.100.7", None, "198.51.100.7"),
        ("198.51.100.7", "203.0.113.66", "198.51.100.7"),  # an untrusted peer's claim is ignored
        ("127.0.0.1", "203.0.113.66", "203.0.113.66"),  # what the trusted proxy saw
        ("127.0.0.1", "203.0.113.66, 198.51.100.7", "198.51.100.7"),  # the client's own claim is further left
        ("127.0.0.1", "203.0.113.66, 198.51.100.7, 10.1.2.3", "198.51.100.7"),  # through two trusted proxies
        ("127.0.0.1", "not-an-address", "127.0.0.1"),
        ("127.0.0.1", "10.1.2.3", "10.1.2.3"),  # every hop trusted: the request began on one of them
        ("127.0.0.1", None, "127.0.0.1"),
    ],
)
def test_client_ip(peer, forwarded, expected):
    assert client_ip(peer, forwarded, PROXIES) == expected


def test_bad_proxy_setting_is_named():
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks(["127.0.0.1", "nope"])
