"""lab/dns.py: exact hosts file content, rewritten in place (same inode)."""

from __future__ import annotations

import os

from nodeagent.lab import dns
from nodeagent.lab.dns import Name

SERVICES = [Name("shop", "web", "10.96.0.11"), Name("back", "db", "10.96.0.10")]
PODS = [Name("shop", "web-a", "10.244.1.2"), Name("back", "db-0", "10.244.2.2")]


def test_hosts_text_names_own_namespace_services_short_and_everything_qualified():
    assert dns.hosts_text("lab1", "shop", "web-a", SERVICES, PODS) == (
        "# nodeagent lab lab1: shop/web-a. Rewritten in place when the lab changes.\n"
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "10.96.0.10\tdb.back db.back.svc db.back.svc.cluster.local\n"
        "10.96.0.11\tweb web.shop web.shop.svc web.shop.svc.cluster.local\n"
        "10.244.2.2\tdb-0.back\n"
        "10.244.1.2\tweb-a.shop\n"
    )


def test_other_namespace_gets_its_own_short_names_only():
    text = dns.hosts_text("lab1", "back", "db-0", SERVICES, PODS)
    assert "10.96.0.10\tdb db.back db.back.svc db.back.svc.cluster.local\n" in text
    assert "10.96.0.11\tweb.shop web.shop.svc web.shop.svc.cluster.local\n" in text


def test_write_in_place_keeps_the_inode_and_truncates(tmp_path):
    path = str(tmp_path / "netns" / "hosts")
    assert dns.write_in_place(path, "a long first version\n") is True
    inode = os.stat(path).st_ino
    assert dns.write_in_place(path, "short\n") is True
    assert dns.write_in_place(path, "short\n") is False
    assert os.stat(path).st_ino == inode
    with open(path) as f:
        assert f.read() == "short\n"
