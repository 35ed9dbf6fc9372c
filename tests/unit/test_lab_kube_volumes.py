"""The lab kubelet's volumes (nodeagent/lab/kube/volumes.py) and securityContext plan
(security.py): what each kind of volume holds, the atomic writer, token renewal by an
injected clock, mount plans, the machine-wide ledger of mount points, refusals."""

from __future__ import annotations

import base64
import datetime as dt
import os
import stat
import threading
import time

import pytest

from nodeagent.errors import ConfigError
from nodeagent.lab.kube import security, volumes

T0 = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)
FIELDS = {"metadata.name": "p", "metadata.namespace": "n", "metadata.uid": "u-1", "spec.nodeName": "kn1",
          "spec.serviceAccountName": "default", "status.podIP": "10.244.1.254", "status.hostIP": "172.30.0.2"}
OBJECTS = {("configMap", "cfg"): {"MODE": b"fast", "LEVEL": b"3"},
           ("secret", "creds"): {"password": b"s3cret", "user": b"admin"}}


def pod(volumes_: list, mounts: list | None = None, **container) -> dict:
    return {"metadata": {"name": "p", "namespace": "n", "uid": "u-1", "labels": {"app": "web", "tier": "b"},
                         "annotations": {"note": 'say "hi"'}},
            "spec": {"nodeName": "kn1", "volumes": volumes_,
                     "containers": [{"name": "main", "command": ["true"], "volumeMounts": mounts or [],
                                     **container}]}}


class Tokens:
    """A TokenRequest stand-in: token-1, token-2… expiring `seconds` after the clock."""

    def __init__(self, clock):
        self.clock, self.asked = clock, []

    def __call__(self, audience: str, seconds: int) -> volumes.Token:
        self.asked.append((audience, seconds))
        return volumes.Token(f"token-{len(self.asked)}", self.clock() + dt.timedelta(seconds=seconds), seconds)


def inputs(item: dict, objects: dict = OBJECTS, tokens=None) -> volumes.Inputs:
    return volumes.Inputs(item, FIELDS, lambda kind, name: objects.get((kind, name)),
                          tokens or Tokens(lambda: T0), lambda: {"cpu": "2", "memory": "4Gi"})


def files(volume: dict, item: dict | None = None, objects: dict = OBJECTS) -> dict:
    item = item or pod([volume])
    return volumes.payload(volume, inputs(item, objects), {}, T0)


def test_a_configmap_volume_holds_every_key_or_the_items_asked_for():
    assert files({"name": "c", "configMap": {"name": "cfg"}}) == {"MODE": (b"fast", 0o644), "LEVEL": (b"3", 0o644)}
    chosen = {"name": "c", "configMap": {"name": "cfg", "defaultMode": 0o400,
                                          "items": [{"key": "MODE", "path": "conf/mode"},
                                                    {"key": "LEVEL", "path": "level", "mode": 0o600}]}}
    assert files(chosen) == {"conf/mode": (b"fast", 0o400), "level": (b"3", 0o600)}


def test_a_secret_volume_is_decoded_with_items_and_modes():
    volume = {"name": "s", "secret": {"secretName": "creds", "defaultMode": 0o440,
                                      "items": [{"key": "password", "path": "pw", "mode": 0o400}]}}
    assert files(volume) == {"pw": (b"s3cret", 0o400)}
    raw = {"data": {"password": base64.b64encode(b"\x00\xffbin").decode()}}
    assert volumes.decode_data("secret", raw) == {"password": b"\x00\xffbin"}
    assert volumes.decode_data("configmap", {"data": {"a": "x"}, "binaryData": {"b": "AAE="}}) == \
        {"a": b"x", "b": b"\x00\x01"}


def test_a_missing_source_waits_unless_optional():
    with pytest.raises(volumes.NotReady, match='MountVolume.SetUp failed for volume "c" : configmap "nope" not found'):
        files({"name": "c", "configMap": {"name": "nope"}})
    assert files({"name": "c", "configMap": {"name": "nope", "optional": True}}) == {}
    with pytest.raises(volumes.NotReady, match='secret "gone" not found'):
        files({"name": "s", "secret": {"secretName": "gone"}})
    with pytest.raises(volumes.NotReady, match="non-existent config key: absent"):
        files({"name": "c", "configMap": {"name": "cfg", "items": [{"key": "absent", "path": "a"}]}})


def test_downward_api_files_are_fields_labels_annotations_and_resources():
    volume = {"name": "d", "downwardAPI": {"items": [
        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "tier", "fieldRef": {"fieldPath": "metadata.labels['tier']"}, "mode": 0o600},
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
        {"path": "cpu", "resourceFieldRef": {"containerName": "main", "resource": "limits.cpu", "divisor": "1m"}},
        {"path": "mem", "resourceFieldRef": {"containerName": "main", "resource": "requests.memory",
                                             "divisor": "1Mi"}}]}}
    item = pod([volume], resources={"limits": {"cpu": "250m"}, "requests": {"memory": "100M"}})
    assert files(volume, item) == {"name": (b"p", 0o644), "labels": (b'app="web"\ntier="b"', 0o644),
                                   "tier": (b"b", 0o600), "annotations": (b'note="say \\"hi\\""', 0o644),
                                   "cpu": (b"250", 0o644), "mem": (b"96", 0o644)}


@pytest.mark.parametrize("resource,divisor,resources,value", [
    ("limits.cpu", None, {"limits": {"cpu": "250m"}}, "1"),  # rounded up to whole cores
    ("limits.cpu", "1m", {"limits": {"cpu": "1500m"}}, "1500"),
    ("limits.cpu", None, {}, "2"),  # no limit: the node's allocatable
    ("limits.memory", None, {}, str(4 * 2**30)),
    ("limits.memory", "1Mi", {"limits": {"memory": "64Mi"}}, "64"),
    ("requests.cpu", "1m", {"requests": {"cpu": "0.1"}}, "100"),
    ("requests.cpu", None, {}, "0"),
    ("requests.memory", "1k", {"requests": {"memory": "1500"}}, "2"),
    ("limits.memory", "0", {"limits": {"memory": "1Mi"}}, str(2**20)),  # the API's default divisor
])
def test_resource_values_are_computed_as_kubelet_does(resource, divisor, resources, value):
    item = pod([], resources=resources)
    assert volumes.resource_value(item, "main", resource, divisor, lambda: {"cpu": "2", "memory": "4Gi"}) == value


def test_a_projected_volume_joins_its_sources_and_requests_a_token():
    clock = [T0]
    tokens = Tokens(lambda: clock[0])
    volume = {"name": "kube-api-access-x", "projected": {"defaultMode": 0o444, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"serviceAccountToken": {"audience": "vault", "expirationSeconds": 600, "path": "vault-token"}},
        {"configMap": {"name": "cfg", "items": [{"key": "MODE", "path": "mode"}]}},
        {"secret": {"name": "creds", "items": [{"key": "user", "path": "user"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}
    held: dict = {}
    got = volumes.payload(volume, inputs(pod([volume]), tokens=tokens), held, T0)
    assert got == {"token": (b"token-1", 0o444), "vault-token": (b"token-2", 0o444), "mode": (b"fast", 0o444),
                   "user": (b"admin", 0o444), "namespace": (b"n", 0o444)}
    assert tokens.asked == [("", 3607), ("vault", 600)]
    # 479 s later neither is due; at 480 s (80% of 600) the vault token is renewed, alone
    for seconds, asked in ((479, 2), (480, 3)):
        clock[0] = T0 + dt.timedelta(seconds=seconds)
        volumes.payload(volume, inputs(pod([volume]), tokens=tokens), held, clock[0])
        assert len(tokens.asked) == asked
    assert tokens.asked[2] == ("vault", 600) and held[1].value == "token-3" and held[0].value == "token-1"


def test_token_renewal_follows_kubelets_rule():
    token = volumes.Token("t", T0 + dt.timedelta(seconds=3607), 3607)
    assert not volumes.needs_refresh(token, T0 + dt.timedelta(seconds=2885))
    assert volumes.needs_refresh(token, T0 + dt.timedelta(seconds=2886))  # 80% of 3607 s
    day = volumes.Token("t", T0 + dt.timedelta(days=10), 10 * 86400)
    assert not volumes.needs_refresh(day, T0 + dt.timedelta(hours=23, minutes=59))
    assert volumes.needs_refresh(day, T0 + dt.timedelta(hours=24))  # at most a day old


def test_the_atomic_writer_swaps_the_whole_set_at_once(tmp_path):
    target = str(tmp_path / "vol")
    assert volumes.write_atomically(target, {"a": (b"1", 0o600), "dir/b": (b"2", 0o644)})
    assert not volumes.write_atomically(target, {"a": (b"1", 0o600), "dir/b": (b"2", 0o644)})  # unchanged
    assert open(f"{target}/a").read() == "1" and open(f"{target}/dir/b").read() == "2"
    assert stat.S_IMODE(os.stat(f"{target}/a").st_mode) == 0o600
    assert os.readlink(f"{target}/a") == "..data/a"
    first = os.readlink(f"{target}/..data")
    assert volumes.write_atomically(target, {"a": (b"new", 0o644)})
    assert open(f"{target}/a").read() == "new" and not os.path.lexists(f"{target}/dir")
    assert sorted(os.listdir(target)) == sorted(["..data", os.readlink(f"{target}/..data"), "a"])
    assert not os.path.exists(f"{target}/{first}")
    with pytest.raises(ConfigError, match="without '..'"):
        volumes.write_atomically(target, {"../escape": (b"x", 0o644)})


def test_a_reader_never_sees_a_partial_token(tmp_path):
    """A token rewritten 200 times while another thread reads it: every read is whole.
    A read may find no file at all — it resolved `..data` just before a swap and opened
    after the replaced set was removed, kubelet's writer has the same window — and reads
    again; any other error fails the test. Each write waits for a read after the previous
    one, so the reader races every write and sees several versions."""
    target, big = str(tmp_path / "vol"), 64 * 1024
    volumes.write_atomically(target, {"token": (b"0" * big, 0o644)})
    seen, errors, reads, done = set(), [], [0], threading.Event()

    def read():
        try:
            while not done.is_set():
                try:
                    with open(f"{target}/token", "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue
                seen.add((len(data), data[:1], data[-1:]))
                reads[0] += 1
        except BaseException as exc:  # noqa: BLE001 (reported by the test, not as a thread warning)
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(200):
            volumes.write_atomically(target, {"token": (str(n % 10).encode() * big, 0o644)})
            after, deadline = reads[0], time.monotonic() + 30
            while reads[0] == after and not errors:
                assert time.monotonic() < deadline, "the reader read nothing for 30 s"
                time.sleep(0.001)
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert all(length == big and first == last for length, first, last in seen), seen
    assert len({first for _, first, _ in seen}) > 1
    assert reads[0] >= 200


def test_set_up_makes_empty_dirs_and_checks_host_paths(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "file").write_text("x")
    vols = [{"name": "scratch", "emptyDir": {}}, {"name": "mem", "emptyDir": {"medium": "Memory"}},
            {"name": "h", "hostPath": {"path": str(host), "type": "Directory"}},
            {"name": "made", "hostPath": {"path": str(tmp_path / "new" / "deep"), "type": "DirectoryOrCreate"}},
            {"name": "f", "hostPath": {"path": str(tmp_path / "touch"), "type": "FileOrCreate"}},
            {"name": "c", "configMap": {"name": "cfg"}}]
    item = pod(vols)
    made = volumes.PodVolumes(item, str(tmp_path / "pod"), inputs(item))
    made.set_up(T0, 0.0)
    assert stat.S_IMODE(os.stat(tmp_path / "pod/volumes/scratch").st_mode) == 0o777
    assert os.path.isdir(tmp_path / "pod/volumes/mem")
    assert made.created == [str(tmp_path / "new"), str(tmp_path / "new/deep"), str(tmp_path / "touch")]
    assert open(tmp_path / "pod/volumes/c/MODE").read() == "fast"
    for kind, path, why in (("Directory", host / "file", "is not a directory"), ("File", host, "is not a file"),
                            ("Socket", host / "file", "is not a socket"), ("File", host / "absent", "is not a file"),
                            ("FileOrCreate", tmp_path / "no" / "f", f"{tmp_path / 'no'} is not a directory")):
        bad = pod([{"name": "h", "hostPath": {"path": str(path), "type": kind}}])
        with pytest.raises(volumes.NotReady, match=f"hostPath type check failed: .*{why}"):
            volumes.PodVolumes(bad, str(tmp_path / "pod2"), inputs(bad)).set_up(T0, 0.0)


def test_resync_renews_a_due_token_and_keeps_files_when_a_source_goes(tmp_path):
    clock = [T0]
    tokens = Tokens(lambda: clock[0])
    vol = {"name": "t", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 600}},
                                                  {"configMap": {"name": "cfg"}}]}}
    item, objects = pod([vol]), dict(OBJECTS)
    made = volumes.PodVolumes(item, str(tmp_path), inputs(item, objects, tokens))
    made.set_up(T0, 0.0)
    token = tmp_path / "volumes/t/token"
    assert token.read_text() == "token-1"
    clock[0] = T0 + dt.timedelta(seconds=479)
    assert not made.due(clock[0], 10.0)
    clock[0] = T0 + dt.timedelta(seconds=480)
    assert made.due(clock[0], 10.0)
    assert made.resync(clock[0], 10.0) == ["t"] and token.read_text() == "token-2"
    del objects[("configMap", "cfg")]
    assert made.due(clock[0], 70.0) and made.resync(clock[0], 70.0) == []  # the old files stay
    assert (tmp_path / "volumes/t/MODE").read_text() == "fast"


@pytest.mark.parametrize("volume,message", [
    ({"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}},
     "volume data: the lab does not implement persistentVolumeClaim volumes"),
    ({"name": "n", "nfs": {"server": "x", "path": "/"}}, "the lab does not implement nfs volumes"),
    ({"name": "c", "csi": {"driver": "x"}}, "the lab does not implement csi volumes"),
    ({"name": "p", "projected": {"sources": [{"clusterTrustBundle": {"name": "x", "path": "b"}}]}},
     "volume p projected.sources\\[0\\]: the lab does not implement clusterTrustBundle sources"),
    ({"name": "h", "hostPath": {"path": "/x", "type": "Sideways"}}, "hostPath.type: unknown type 'Sideways'"),
])
def test_volumes_the_lab_does_not_make_are_refused_by_name(volume, message):
    with pytest.raises(ConfigError, match=message):
        volumes.check(pod([volume]))


def test_mounts_are_planned_parents_first_with_sub_paths(tmp_path):
    host = tmp_path / "host"
    (host / "logs").mkdir(parents=True)
    vols = [{"name": "c", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}},
            {"name": "h", "hostPath": {"path": str(host)}}]
    mounts = [{"name": "c", "mountPath": "/etc/app/conf/"}, {"name": "scratch", "mountPath": "/etc/app"},
              {"name": "h", "mountPath": "/var/log/app", "subPathExpr": "$(POD_NAME)", "readOnly": True},
              {"name": "c", "mountPath": "/etc/mode", "subPath": "MODE"}]
    item = pod(vols, mounts)
    pod_dir = str(tmp_path / "pod")
    volumes.PodVolumes(item, pod_dir, inputs(item)).set_up(T0, 0.0)
    plan = volumes.container_mounts(item, "main", pod_dir, {"POD_NAME": "p"})
    assert plan == [volumes.Mount(f"{pod_dir}/volumes/scratch", "/etc/app", False),
                    volumes.Mount(f"{pod_dir}/volumes/c/MODE", "/etc/mode", True),
                    volumes.Mount(f"{pod_dir}/volumes/c", "/etc/app/conf", True),
                    volumes.Mount(f"{host}/p", "/var/log/app", True)]
    assert os.path.isdir(host / "p")  # a missing subPath is made, as kubelet makes it
    assert volumes.mount_points(plan) == [("/etc/app", True), ("/etc/mode", False),
                                          (f"{pod_dir}/volumes/scratch/conf", True), ("/var/log/app", True)]
    script = volumes.mount_script(plan[:2], read_only_root=True)
    assert script == (f"mount -o remount,bind,ro / && mount --bind {pod_dir}/volumes/scratch /etc/app && "
                      f"mount --bind {pod_dir}/volumes/c/MODE /etc/mode && mount -o remount,bind,ro /etc/mode")
    with pytest.raises(ConfigError, match="without '..'"):
        volumes.container_mounts(pod(vols, [{"name": "h", "mountPath": "/x", "subPath": "../etc"}]), "main",
                                 pod_dir, {})


def test_mounts_of_a_missing_volume_or_init_containers_are_refused():
    with pytest.raises(ConfigError, match="container main volumeMounts\\[0\\]: no volume named 'x'"):
        volumes.check(pod([], [{"name": "x", "mountPath": "/x"}]))
    with pytest.raises(ConfigError, match="mountPropagation: the lab does not propagate"):
        volumes.check(pod([{"name": "e", "emptyDir": {}}],
                          [{"name": "e", "mountPath": "/x", "mountPropagation": "Bidirectional"}]))


def test_the_ledger_removes_mount_points_when_their_last_pod_goes(tmp_path):
    run_root, base = str(tmp_path / "run"), tmp_path / "machine"
    base.mkdir()
    point, sock = str(base / "a" / "b" / "c"), str(base / "file")
    volumes.claim(run_root, "lab1:u1", [(point, True), (sock, False)])
    assert os.path.isdir(point) and os.path.isfile(sock)
    volumes.claim(run_root, "lab2:u2", [(point, True)])
    assert volumes.release(run_root, "lab1:u1") == []
    assert os.path.isdir(point) and not os.path.exists(sock)  # lab2's pod still mounts there
    volumes.release(run_root, "lab2:u2")
    assert os.listdir(base) == [] and os.listdir(run_root) == []  # ledger gone with its last entry


def test_a_lab_going_down_leaves_the_parents_of_another_labs_mount_point_to_it(tmp_path):
    run_root, base = str(tmp_path / "run"), tmp_path / "machine"
    base.mkdir()
    point = str(base / "secrets" / "sa")
    volumes.claim(run_root, "lab1:u1", [(point, True)])  # lab1 made secrets/ and secrets/sa
    volumes.claim(run_root, "lab2:u2", [(point, True)])
    assert volumes.release(run_root, "lab1:", final=True) == []
    assert os.path.isdir(point)
    assert volumes.release(run_root, "lab2:", final=True) == []
    assert os.listdir(base) == [] and os.listdir(run_root) == []


def test_created_host_paths_keep_their_content_until_lab_down(tmp_path):
    run_root, made = str(tmp_path / "run"), tmp_path / "data"
    made.mkdir()
    volumes.claim(run_root, "lab1:u1", [], [str(made)])
    (made / "written").write_text("x")
    volumes.release(run_root, "lab1:u1")
    assert (made / "written").exists()  # the pod's data outlives the pod, as on a node
    volumes.release(run_root, "lab10:", final=True)
    assert made.exists()  # another lab's prefix
    assert volumes.release(run_root, "lab1:", final=True) == []
    assert not made.exists() and os.listdir(run_root) == []


def test_security_context_becomes_setpriv():
    def plan(sc=None, pod_sc=None, **spec):
        item = {"spec": {"securityContext": pod_sc or {}, **spec}}
        return security.plan(item, {"name": "main", "securityContext": sc or {}})

    assert plan() == security.Plan((), False, ())
    assert plan({"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "CAP_NET_RAW"]}}).argv == \
        ("setpriv", "--bounding-set=-all,+net_admin,+net_raw", "--")
    assert plan({"capabilities": {"drop": ["SYS_ADMIN"]}, "allowPrivilegeEscalation": False}).argv == \
        ("setpriv", "--no-new-privs", "--bounding-set=-sys_admin", "--")
    assert plan({"privileged": True, "capabilities": {"drop": ["ALL"]}}).argv == ()
    assert plan({"runAsUser": 1000}, {"runAsGroup": 2000, "supplementalGroups": [5, 6]}).argv == \
        ("setpriv", "--reuid=1000", "--regid=2000", "--groups=5,6", "--")
    assert plan({"readOnlyRootFilesystem": True}).read_only_root
    assert plan({"seccompProfile": {"type": "RuntimeDefault"}}, {"fsGroup": 3}, hostUsers=False).warnings == (
        "spec.securityContext.fsGroup is not applied by the lab",
        "container main: securityContext.seccompProfile is not applied by the lab",
        "spec.hostUsers: false: the lab has no user namespaces; the container runs as the machine's users")
    assert plan({"appArmorProfile": {"type": "Unconfined"}}, {"seccompProfile": {"type": "Unconfined"}}).warnings == ()
    with pytest.raises(ConfigError, match="container has runAsNonRoot and image will run as root"):
        plan({"runAsNonRoot": True})
    assert plan({"runAsNonRoot": True, "runAsUser": 65534}).argv[1] == "--reuid=65534"
    with pytest.raises(ConfigError, match="capabilities.add: unknown capability 'NET_FLY'"):
        plan({"capabilities": {"add": ["NET_FLY"]}})
