"""Where webhooks may go and how they are signed, checked against the Standard Webhooks reference
library (`standardwebhooks`), not against our own code."""

import base64

import pytest
from standardwebhooks import Webhook

from tasks.runtime.delivery import AllowedHosts, HostUnresolved, WebhookRefused, new_secret, secret_key, signature

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_the_signature_is_the_one_the_reference_library_computes():
    body = b'{"type": "job.succeeded", "data": {"id": "job_1"}}'
    ours = signature(secret_key(SECRET), "msg_job_1", 1_700_000_000, body)
    from datetime import UTC, datetime

    reference = Webhook(SECRET).sign("msg_job_1", datetime.fromtimestamp(1_700_000_000, tz=UTC), body.decode())
    assert ours == reference
    assert ours != signature(secret_key(new_secret()), "msg_job_1", 1_700_000_000, body)


def test_a_new_secret_is_one_the_reference_library_accepts_and_bad_ones_are_refused():
    secret = new_secret()
    assert secret.startswith("whsec_") and len(secret_key(secret)) == 32
    Webhook(secret)  # decodes it
    for bad in (None, "", "whsec_", "not-a-secret", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            secret_key(bad)


def refused(hosts: AllowedHosts, url: str) -> str:
    with pytest.raises(WebhookRefused) as caught:
        hosts.check(url)
    return str(caught.value)


def test_by_default_only_public_addresses_are_allowed():
    hosts = AllowedHosts.parse("")
    assert hosts.check("https://8.8.8.8/hook?x=1").path == "/hook?x=1"
    assert hosts.check("http://[2001:4860:4860::8888]:8080").port == 8080
    for url, kind in [
        ("http://127.0.0.1:8000/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),  # IPv4-mapped: checked as the IPv4 address
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://100.64.0.1/hook", "non-public"),  # carrier-grade NAT
    ]:
        assert kind in refused(hosts, url), url
    assert "loopback" in refused(hosts, "http://localhost:8000/hook")  # checked after resolution


def test_listed_hosts_and_networks_are_allowed_and_nothing_else_unless_star():
    listed = AllowedHosts.parse("10.0.0.0/8, localhost, 127.0.0.1")
    assert listed.check("http://10.9.8.7/hook").addresses[0].exploded == "10.9.8.7"
    assert listed.check("http://LOCALHOST:9/hook").host == "localhost"  # a listed name, wherever it resolves
    assert listed.check("http://127.0.0.1/hook")
    assert "not in GENQUEUE_WEBHOOK_ALLOWED_HOSTS" in refused(listed, "https://8.8.8.8/hook")
    assert "not in GENQUEUE_WEBHOOK_ALLOWED_HOSTS" in refused(listed, "http://192.168.1.1/hook")
    both = AllowedHosts.parse(["*", "10.0.0.0/8"])
    assert both.check("https://8.8.8.8/hook") and both.check("http://10.0.0.1/hook")
    assert "private" in refused(both, "http://192.168.1.1/hook")


def test_urls_that_can_never_be_delivered_are_refused():
    hosts = AllowedHosts.parse("*")
    for url in ("ftp://8.8.8.8/x", "http:///path", "8.8.8.8/hook", "http://user:pw@8.8.8.8/", "http://8.8.8.8:99999/"):
        refused(hosts, url)
    refused(hosts, 42)
    refused(hosts, "http://8.8.8.8/" + "x" * 3000)
    with pytest.raises(HostUnresolved):
        hosts.check("http://no-such-host.invalid/hook")
