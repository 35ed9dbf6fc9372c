"""Agent config: every setting from flag, env and default; bad values named."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nodeagent.agent import config
from nodeagent.errors import ConfigError
from nodeagent.tunnel import TunnelSettings
from nodeagent.xds.envoy import EnvoyUser


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cg").mkdir()
    return {"node": "node-1", "source": f"files:{tmp_path / 'cluster'}", "cgroup": str(tmp_path / "cg")}


def load(given: dict, env: dict | None = None) -> config.AgentConfig:
    return config.load(given, env or {})


def test_defaults(base):
    cfg = load(base)
    assert cfg.node == "node-1"
    assert cfg.source_dir == Path(base["source"][len("files:"):])
    assert cfg.cgroup == Path(base["cgroup"])
    assert cfg.bpffs == Path("/sys/fs/bpf/nodeagent")
    assert cfg.admin_socket == Path("/run/nodeagent/agent.sock")
    assert cfg.admin_address == ("127.0.0.1", 15020) and cfg.admin_port == 15020
    assert cfg.mark == 0x539
    assert (cfg.outbound_port, cfg.inbound_port, cfg.tunnel_port) == (15001, 15006, 15008)
    assert cfg.keep_on_exit is True  # a stop keeps capture: fail closed until the next agent
    assert cfg.poll_interval == 0.1
    assert (cfg.log_level, cfg.log_format) == ("info", "text")
    assert cfg.compile_timeout == 120.0
    assert cfg.hbone_handshake_timeout == 5.0 == TunnelSettings().server_handshake_timeout


def test_every_setting_has_flag_and_env():
    names = {s.name for s in config.SETTINGS}
    fields = set(config.AgentConfig.__dataclass_fields__) - {"source_dir"}
    assert names == fields
    for s in config.SETTINGS:
        assert s.flag == "--" + s.name.replace("_", "-")
        assert s.env == "NODEAGENT_" + s.name.upper()


ENV_VALUES = {
    "NODEAGENT_BPFFS": ("/sys/fs/bpf/other", "bpffs", Path("/sys/fs/bpf/other")),
    "NODEAGENT_ADMIN_SOCKET": ("/tmp/a.sock", "admin_socket", Path("/tmp/a.sock")),
    "NODEAGENT_ADMIN_ADDRESS": ("[::1]:9000", "admin_address", ("::1", 9000)),
    "NODEAGENT_MARK": ("0x100", "mark", 0x100),
    "NODEAGENT_DELIVERY_MARK": ("0x200", "delivery_mark", 0x200),
    "NODEAGENT_OUTBOUND_PORT": ("16001", "outbound_port", 16001),
    "NODEAGENT_INBOUND_PORT": ("16006", "inbound_port", 16006),
    "NODEAGENT_TUNNEL_PORT": ("16008", "tunnel_port", 16008),
    "NODEAGENT_KEEP_ON_EXIT": ("yes", "keep_on_exit", True),
    "NODEAGENT_POLL_INTERVAL": ("0.5", "poll_interval", 0.5),
    "NODEAGENT_LOG_LEVEL": ("DEBUG", "log_level", "debug"),
    "NODEAGENT_LOG_FORMAT": ("json", "log_format", "json"),
    "NODEAGENT_COMPILE_TIMEOUT": ("900", "compile_timeout", 900.0),
    "NODEAGENT_HBONE_HANDSHAKE_TIMEOUT": ("150", "hbone_handshake_timeout", 150.0),
}


@pytest.mark.parametrize("env", sorted(ENV_VALUES))
def test_env_sets_each_setting(base, env):
    raw, attr, expected = ENV_VALUES[env]
    assert getattr(load(base, {env: raw}), attr) == expected


def test_env_supplies_required_settings(base):
    env = {"NODEAGENT_NODE": "n2", "NODEAGENT_SOURCE": base["source"], "NODEAGENT_CGROUP": base["cgroup"]}
    cfg = load({}, env)
    assert cfg.node == "n2"


def test_flag_wins_over_env(base):
    cfg = load({**base, "mark": "0x10", "keep_on_exit": False},
               {"NODEAGENT_MARK": "0x20", "NODEAGENT_KEEP_ON_EXIT": "true"})
    assert cfg.mark == 0x10 and cfg.keep_on_exit is False


def test_cli_flags_parse(base):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--node", "n1", "--source", base["source"], "--cgroup", base["cgroup"],
                              "--keep-on-exit", "--admin-address", "0.0.0.0:15021", "--log-format", "json"])
    cfg = config.load(args, {})
    assert cfg.keep_on_exit and cfg.admin_address == ("0.0.0.0", 15021) and cfg.log_format == "json"
    args = parser.parse_args(["--no-keep-on-exit"])
    assert args.keep_on_exit is False


def test_the_help_renders_every_setting():
    """`nodeagent run --help` prints each setting's help, a literal "%" in it too (argparse
    formats help texts with %: "90 % of it" crashed --help)."""
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "hold 90 % of it" in text
    assert all(s.flag in text for s in config.SETTINGS)


BAD = [
    ("node", "Node_1", "DNS-1123"),
    ("source", "kube:", "needs the kubeconfig's path"),
    ("source", "kube:/does/not/exist", "is not a file"),
    ("source", "http://x", "files:DIR"),
    ("source", "files:/does/not/exist", "not a directory"),
    ("cgroup", "relative/cg", "absolute"),
    ("cgroup", "/does/not/exist", "does not exist"),
    ("bpffs", "bpf/x", "absolute"),
    ("admin_socket", "agent.sock", "absolute"),
    ("admin_address", "localhost:15020", "not an IP address"),
    ("admin_address", "127.0.0.1", "HOST:PORT"),
    ("admin_address", "127.0.0.1:70000", "1-65535"),
    ("mark", "0", "non-zero"),
    ("mark", "0x1ffffffff", "32-bit"),
    ("mark", "abc", "integer"),
    ("outbound_port", "0", "1-65535"),
    ("inbound_port", "x", "integer"),
    ("tunnel_port", "65536", "1-65535"),
    ("keep_on_exit", "maybe", "true or false"),
    ("poll_interval", "0", "between"),
    ("poll_interval", "fast", "seconds"),
    ("log_level", "loud", "debug, info"),
    ("log_format", "xml", "text, json"),
    ("ca_address", "ca.example:", "HOST:PORT"),
    ("ca_address", "under_score:15012", "neither an IP address nor a DNS name"),
    ("ca_root_cert", "/does/not/exist.pem", "no such file"),
    ("ca_server_name", "Not A Name", "DNS name"),
    ("trust_domain", "Cluster.Local", "lowercase"),
    ("cert_ttl", "30s", "between 1m and 90d"),
    ("cert_ttl", "soon", "duration"),
    ("identity_dir", "run/identity", "absolute"),
    ("root_namespace", "Istio_System", "namespace"),
    ("flow_log", "flows.log", "absolute"),
    ("flow_log", "/does/not/exist/flows.log", "is not a directory"),
    ("waypoint", "sometimes", "true or false"),
    ("waypoint_dir", "run/waypoint", "absolute"),
    ("waypoint_dir", "/run/" + "w" * 100, "would exceed 107 bytes"),
    ("envoy_user", "envoy", "UID[:GID] (numbers) or root"),
    ("envoy_user", "1337:", "UID[:GID] (numbers) or root"),
    ("envoy_user", "0", "0 is root's: write root"),
    ("envoy_user", "1337:0", "0 is root's: write root"),
    ("envoy_user", "4294967295", "below 4294967295"),
    ("compile_timeout", "5", "between 10 and 3600 seconds"),
    ("compile_timeout", "2m", "a number of seconds"),
    ("hbone_handshake_timeout", "0.5", "between 1 and 300 seconds"),
    ("hbone_handshake_timeout", "301", "between 1 and 300 seconds"),
]


@pytest.mark.parametrize("name,raw,why", BAD)
def test_bad_flag_is_named(base, name, raw, why):
    with pytest.raises(ConfigError) as err:
        load({**base, name: raw})
    text = str(err.value)
    assert f"setting {name}" in text and repr(raw) in text and why in text
    assert "--" + name.replace("_", "-") in text and "NODEAGENT_" + name.upper() in text


@pytest.mark.parametrize("name,raw,why", BAD[:3])
def test_bad_env_is_named(base, name, raw, why):
    given = {k: v for k, v in base.items() if k != name}
    env = "NODEAGENT_" + name.upper()
    with pytest.raises(ConfigError, match=f"setting {name} \\({env}\\)"):
        load(given, {env: raw})


def test_required_settings(base):
    for name in ("node", "source"):
        given = {k: v for k, v in base.items() if k != name}
        with pytest.raises(ConfigError, match=f"setting {name}: is required"):
            load(given)


def test_ports_must_differ(base):
    with pytest.raises(ConfigError, match="setting inbound_port: port 15001 is also used by outbound_port"):
        load({**base, "inbound_port": "15001"})
    with pytest.raises(ConfigError, match="admin_address: port 15008"):
        load({**base, "admin_address": "127.0.0.1:15008"})


def test_the_waypoint_is_on_by_default_and_its_envoy_runs_as_a_uid_of_its_own(base):
    cfg = load(base)
    assert (cfg.waypoint, cfg.waypoint_dir, cfg.envoy_user) == (True, Path("/run/nodeagent/waypoint"),
                                                               EnvoyUser(10337, 10337))
    assert load({**base, "waypoint": False}).waypoint is False
    assert load({**base, "envoy_user": "2000:3000"}).envoy_user == EnvoyUser(2000, 3000)
    assert load({**base, "envoy_user": "root"}).envoy_user is None
    assert load({**base, "envoy_user": "root"}).as_dict()["envoy_user"] is None


def test_the_envoy_admin_port_is_gone_and_says_so(base):
    """The admin API moved to a unix socket: an environment still setting the port is
    told, not ignored (the flag is refused by the command line)."""
    with pytest.raises(ConfigError, match=r"envoy_admin_port \(NODEAGENT_ENVOY_ADMIN_PORT\): is gone: .*admin\.sock"):
        load(base, {"NODEAGENT_ENVOY_ADMIN_PORT": "0"})


def test_cgroup_default_is_the_cgroup2_mount(base, tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert config.cgroup2_root(str(mounts)) == "/sys/fs/cgroup/unified"
    mounts.write_text("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n")
    with pytest.raises(ValueError, match="no cgroup2 mount"):
        config.cgroup2_root(str(mounts))


def test_as_dict_is_json_ready(base):
    import json

    cfg = load(base)
    shown = json.loads(json.dumps(cfg.as_dict()))
    assert set(shown) == set(config.AgentConfig.__dataclass_fields__)
    # Paths as strings, durations as seconds, tuples as lists; the rest as it is.
    assert (shown["node"], shown["source_dir"], shown["cgroup"], shown["bpffs"]) == \
        ("node-1", base["source"][len("files:"):], base["cgroup"], "/sys/fs/bpf/nodeagent")
    assert (shown["admin_address"], shown["mark"], shown["keep_on_exit"], shown["poll_interval"]) == \
        (["127.0.0.1", 15020], 0x539, cfg.keep_on_exit, 0.1)
    assert (shown["cert_ttl"], shown["ca_address"], shown["waypoint_dir"]) == (86400.0, None, "/run/nodeagent/waypoint")
    assert shown["envoy_user"] == "10337:10337"


def test_delivery_mark_must_differ_from_mark(base):
    assert load(base).delivery_mark == 0x1539
    with pytest.raises(ConfigError, match="setting delivery_mark: must differ from mark"):
        load({**base, "delivery_mark": "0x539"})


def test_identity_settings_default_to_no_ca(base):
    cfg = load(base)
    assert cfg.ca_address is None and not cfg.identity_enabled
    assert cfg.ca_root_cert is None and cfg.ca_token_file is None
    assert cfg.ca_server_name == "nodeagent-ca.istio-system.svc"
    assert (cfg.trust_domain, cfg.root_namespace) == ("cluster.local", "istio-system")
    assert cfg.cert_ttl.total_seconds() == 86400
    assert cfg.identity_dir == Path("/run/nodeagent/identity")
    assert cfg.flow_log == "stderr"


def test_a_ca_needs_its_root_and_a_token(base, tmp_path):
    root, token = tmp_path / "root-cert.pem", tmp_path / "node.token"
    root.write_text("x")
    token.write_text("t")
    cfg = load({**base, "ca_address": "nodeagent-ca.istio-system.svc:15012", "ca_root_cert": str(root),
                "ca_token_file": str(token), "cert_ttl": "1h", "flow_log": str(tmp_path / "flows.log")})
    assert cfg.ca_address == ("nodeagent-ca.istio-system.svc", 15012) and cfg.identity_enabled
    assert cfg.cert_ttl.total_seconds() == 3600 and cfg.flow_log == tmp_path / "flows.log"
    assert load({**base, "ca_address": "[fd00::1]:15012", "ca_root_cert": str(root),
                 "ca_token_file": str(token)}).ca_address == ("fd00::1", 15012)
    with pytest.raises(ConfigError, match="setting ca_root_cert: is required when ca_address is set"):
        load({**base, "ca_address": "10.0.0.1:15012", "ca_token_file": str(token)})
    with pytest.raises(ConfigError, match="setting ca_token_file: is required .*--ca-token-file"):
        load({**base, "ca_address": "10.0.0.1:15012", "ca_root_cert": str(root)})


def test_status_config_is_json_ready_with_identity(base, tmp_path):
    import json

    (tmp_path / "r").write_text("x")
    data = load({**base, "ca_address": "10.0.0.1:15012", "ca_root_cert": str(tmp_path / "r"),
                 "ca_token_file": str(tmp_path / "r")}).as_dict()
    assert json.loads(json.dumps(data))["cert_ttl"] == 86400.0
