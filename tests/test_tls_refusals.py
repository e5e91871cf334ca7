"""TLS refusals: every way a TLS migration must not happen fails with a clear error on both
sides, before a byte of guest memory goes, and the source guest runs on."""

from __future__ import annotations

import pytest

from _migration_helpers import guest_config, guests, migrate_locally, wait_for  # noqa: F401
from _tls_helpers import SOURCE_DN, Pki, client_cert, days, pki, server_cert  # noqa: F401

from pymig.errors import TlsError
from pymig.transport.tlscreds import TlsCredentials


def _refused(guest, source_dir: str | None, destination, *, hostname: str = "",
             authz: tuple[str, ...] = (), pki: Pki):
    """Migrate ``guest`` with the source's credentials ``source_dir`` (None: plaintext) to a
    destination with ``destination`` credentials (None: plaintext); returns (source error,
    destination error), having checked that the migration failed and the guest runs on."""
    params = {"tls-creds": "tls0", "tls-hostname": hostname} if source_dir else {}
    store = pki.store(source_dir) if source_dir else None
    tls = (destination, authz) if destination is not None else None
    done = migrate_locally(guest, "tcp:127.0.0.1:0", params=params, credentials=store,
                           tls=tls, timeout=60)
    stats = done.migration.query()
    assert stats["status"] == "failed", stats
    assert done.result is None and done.error is not None
    if source_dir:  # a TLS source sends nothing before the destination's verdict
        assert stats["ram"]["transferred"] == 0
    assert guest.status == "running"
    passes = guest.progress()["passes"]
    wait_for(lambda: guest.progress()["passes"] > passes, what="the source guest to run on")
    return stats["error-desc"], str(done.error)


@pytest.fixture
def guest(guests):
    return guests(guest_config("simulated", memory=32 << 20, working_set=4 << 20))


def test_plaintext_source_to_a_tls_destination(guest, pki):
    source, destination = _refused(guest, None, pki.creds(), pki=pki)
    assert "accepts migrations over TLS only" in source
    assert "set tls-creds on the source" in source
    assert "sent a plaintext migration stream" in destination


def test_tls_source_to_a_plaintext_destination(guest, pki):
    source, destination = _refused(guest, pki.dir(), None, pki=pki)
    assert "does not speak TLS" in source
    assert "answered in plaintext" in source and "no tls-creds" in source
    assert "the source speaks TLS" in destination and "no tls-creds" in destination


def test_destination_certificate_from_an_unknown_ca(guest, pki, tmp_path):
    other = Pki(tmp_path / "other")
    source, destination = _refused(guest, pki.dir(), other.creds(), pki=pki)
    assert "the destination's certificate is not accepted here" in source
    assert "ca-cert.pem" in source
    assert "TLS alert: unknown ca" in destination


def test_source_certificate_from_an_unknown_ca(guest, pki, tmp_path):
    other = Pki(tmp_path / "other")
    source_dir = pki.dir(client=client_cert(other.ca))  # trusts pki's CA, signed by another
    source, destination = _refused(guest, source_dir, pki.creds(), pki=pki)
    assert "TLS alert: unknown ca" in source
    assert "does not trust the CA that signed this side's certificate" in source
    assert "the source's certificate is not accepted here" in destination
    assert "unable to get local issuer certificate" in destination


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_source_certificate_out_of_its_dates(guest, pki, when):
    dates = ({"not_before": days(-10), "not_after": days(-1)} if when == "expired"
             else {"not_before": days(1), "not_after": days(10)})
    source_dir = pki.dir(client=client_cert(pki.ca, **dates))
    source, destination = _refused(guest, source_dir, pki.creds(), pki=pki)
    assert "the destination refused this side (TLS alert:" in source
    expected = "certificate has expired" if when == "expired" else "certificate is not yet valid"
    assert expected in destination


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_destination_certificate_out_of_its_dates(guest, pki, when):
    dates = ({"not_before": days(-10), "not_after": days(-1)} if when == "expired"
             else {"not_before": days(1), "not_after": days(10)})
    destination_creds = pki.creds(server=server_cert(pki.ca, **dates))
    source, destination = _refused(guest, pki.dir(), destination_creds, pki=pki)
    expected = "certificate has expired" if when == "expired" else "certificate is not yet valid"
    assert expected in source
    assert "the source refused this side (TLS alert:" in destination


def test_wrong_host_name(guest, pki):
    destination_creds = pki.creds(server=server_cert(pki.ca, "dst.example"))
    source, destination = _refused(guest, pki.dir(), destination_creds,
                                   hostname="other.example", pki=pki)
    assert "Hostname mismatch" in source and "'other.example'" in source
    assert "tls-hostname" in source
    assert "the source refused this side (TLS alert: bad certificate)" in destination


def test_an_ip_address_is_checked_against_the_certificates_addresses(guest, pki):
    # the URI's host, 127.0.0.1, is not among the addresses of a certificate for a name only
    destination_creds = pki.creds(server=server_cert(pki.ca, "dst.example"))
    source, destination = _refused(guest, pki.dir(), destination_creds, pki=pki)
    assert "IP address mismatch" in source and "127.0.0.1" in source
    assert "TLS alert: bad certificate" in destination


def test_source_outside_tls_authz(guest, pki):
    source, destination = _refused(guest, pki.dir(), pki.creds(),
                                   authz=("CN=other.example,O=Example", "CN=*,O=Elsewhere"),
                                   pki=pki)
    assert "the destination refused this source" in source
    assert SOURCE_DN in source and "not in tls-authz" in source
    assert "refused the source" in destination and SOURCE_DN in destination


def test_source_without_a_certificate_where_the_destination_verifies_peers(guest, pki):
    # the source's own credentials refuse to send without client-cert.pem: said at migrate
    store_dir = pki.dir(client=False)
    with pytest.raises(Exception) as info:
        _refused(guest, store_dir, pki.creds(), pki=pki)
    assert "client-cert.pem" in str(info.value)
    assert guest.status == "running"


@pytest.mark.parametrize("pair", ["server", "client"])
def test_a_key_that_does_not_match_its_certificate_is_refused_when_loading(pki, pair):
    directory = pki.dir()
    other = server_cert(pki.ca) if pair == "server" else client_cert(pki.ca)
    with open(f"{directory}/{pair}-key.pem", "wb") as out:
        out.write(other.private_key_pem.bytes())
    with pytest.raises(TlsError, match=f"{pair}-key.pem is not the key of {pair}-cert.pem"):
        TlsCredentials.load(directory)


def test_incomplete_or_missing_credentials_are_refused_when_loading(pki, tmp_path):
    with pytest.raises(TlsError, match="not a directory"):
        TlsCredentials.load(str(tmp_path / "nowhere"))
    directory = pki.dir()
    import os

    os.unlink(f"{directory}/server-key.pem")
    with pytest.raises(TlsError, match="server-key.pem is missing"):
        TlsCredentials.load(directory)
    os.unlink(f"{directory}/ca-cert.pem")
    with pytest.raises(TlsError, match="no ca-cert.pem"):
        TlsCredentials.load(directory)
    garbled = pki.dir()
    with open(f"{garbled}/ca-cert.pem", "w") as out:
        out.write("not a certificate\n")
    with pytest.raises(TlsError, match="ca-cert.pem: not a usable CA certificate"):
        TlsCredentials.load(garbled)
