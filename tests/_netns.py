"""Network namespaces for the tests: :mod:`pymig.netns`'s pair, skipped where none can be built.

    from _netns import NetnsPair

    pytestmark = pytest.mark.netns

    def test_something():
        with NetnsPair() as net:                  # unique names, torn down on any exit
            net.shape(rate="100mbit")             # tbf on a's egress; delay=... needs netem
            server = net.python("b", SERVER_CODE, str(port))
            client = net.python("a", CLIENT_CODE, f"tcp:{net.ipv4('b')}:{port}")
"""

from __future__ import annotations

import pytest

from pymig import netns
from pymig.netns import (IFNAME, IPV4, IPV6, PREFIX, NetnsUnsupported,
                         netns_unavailable_reason, remove_stale)

__all__ = ["IFNAME", "IPV4", "IPV6", "PREFIX", "NetnsPair", "NetnsUnsupported",
           "netns_unavailable_reason", "remove_stale", "skip_unless_netns"]


def skip_unless_netns() -> None:
    """pytest.skip with the reason when namespaces cannot be built here."""
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)


class NetnsPair(netns.NetnsPair):
    def __enter__(self) -> "NetnsPair":
        skip_unless_netns()
        return super().__enter__()
