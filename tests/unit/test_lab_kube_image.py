"""The stand-in for a container's image (nodeagent/lab/kube/image.py): which directories
keep a non-root user from the machine's installation, and the mount steps that give it
that installation in the container's own mount namespace."""

from __future__ import annotations

import os
import stat
import sys

from nodeagent.lab.kube import image, security

DIR = stat.S_IFDIR


def st(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((DIR | mode, 0, 0, 2, uid, gid, 0, 0, 0, 0))


# A machine like this one and CI's: a pyenv Python under a 0700 /root, the project cloned
# under a 0700 directory of another user's home, its venv inside the project.
TREE = {"/": st(0o755), "/root": st(0o700), "/root/.pyenv": st(0o755), "/root/.pyenv/versions": st(0o755),
        "/root/.pyenv/versions/3.11.7": st(0o755), "/home": st(0o755), "/home/ci": st(0o750, 1001, 1001),
        "/home/ci/work": st(0o700, 1001, 1001), "/home/ci/work/main": st(0o755, 1001, 1001),
        "/home/ci/work/main/.venv": st(0o755, 1001, 1001), "/opt": st(0o755), "/opt/secret": st(0o750, 0, 0)}
INSTALL = image.outermost(["/root/.pyenv/versions/3.11.7", "/home/ci/work/main/.venv", "/home/ci/work/main"])


def test_the_installation_is_its_outer_paths():
    assert INSTALL == ("/home/ci/work/main", "/root/.pyenv/versions/3.11.7")
    assert image.outermost(["/a/b", "/a", "/a", "/ab"]) == ("/a", "/ab")
    here = image.installation()
    assert os.path.realpath(sys.base_prefix) in here or any(
        os.path.realpath(sys.base_prefix).startswith(p + "/") for p in here)
    assert os.path.isfile(os.path.join(next(p for p in here if os.path.isdir(os.path.join(p, "nodeagent"))),
                                       "nodeagent", "__init__.py"))


def test_the_topmost_directory_a_user_cannot_traverse_is_covered():
    cover, unreadable = image.blocked(INSTALL, 65532, frozenset({65532}), TREE.__getitem__)
    assert cover == {"/home/ci": ("/home/ci/work/main",), "/root": ("/root/.pyenv/versions/3.11.7",)}
    assert unreadable == []
    # the clone's owner passes /home/ci and is stopped by nothing; its group only by /home/ci/work
    assert image.blocked(INSTALL, 1001, frozenset({1001}), TREE.__getitem__)[0] == {
        "/root": ("/root/.pyenv/versions/3.11.7",)}
    assert image.blocked(INSTALL, 1002, frozenset({1001}), TREE.__getitem__)[0] == {
        "/home/ci/work": ("/home/ci/work/main",), "/root": ("/root/.pyenv/versions/3.11.7",)}
    assert image.blocked(INSTALL, 0, frozenset(), TREE.__getitem__) == ({}, [])
    # an installation directory the user cannot read itself (a clone in a 0700 mktemp -d)
    # covers itself: all its entries come back; under a blocking ancestor too, it is named
    assert image.blocked(("/opt/secret",), 65532, frozenset({65532}), TREE.__getitem__) == (
        {"/opt/secret": ("/opt/secret",)}, [])
    assert image.blocked(("/home/ci/work",), 65532, frozenset({65532}), TREE.__getitem__) == (
        {"/home/ci": ("/home/ci/work",)}, ["/home/ci/work"])


def test_the_mount_steps_bring_back_only_the_installation():
    cover = {"/home/ci": ("/home/ci/work/main",), "/root": ("/root/.pyenv/versions/3.11.7",)}
    assert image.stage_count(cover) == 2
    assert image.mount_steps(cover, "/run/p/image/ca", read_only=True) == [
        "mount -n --rbind /home/ci/work/main /run/p/image/ca/0",
        "mount -n -t tmpfs -o mode=0755 nodeagent-image /home/ci",
        "(umask 022 && mkdir -p /home/ci/work/main)",
        "mount -n --move /run/p/image/ca/0 /home/ci/work/main",
        "mount -n -o remount,ro /home/ci",
        "mount -n --rbind /root/.pyenv/versions/3.11.7 /run/p/image/ca/1",
        "mount -n -t tmpfs -o mode=0755 nodeagent-image /root",
        "(umask 022 && mkdir -p /root/.pyenv/versions/3.11.7)",
        "mount -n --move /run/p/image/ca/1 /root/.pyenv/versions/3.11.7",
        "mount -n -o remount,ro /root"]
    two = {"/root": ("/root/a b", "/root/c")}
    assert image.mount_steps(two, "/s") == [
        "mount -n --rbind '/root/a b' /s/0", "mount -n --rbind /root/c /s/1",
        "mount -n -t tmpfs -o mode=0755 nodeagent-image /root",
        "(umask 022 && mkdir -p '/root/a b')", "mount -n --move /s/0 '/root/a b'",
        "(umask 022 && mkdir -p /root/c)", "mount -n --move /s/1 /root/c"]


def test_the_plan_names_the_user_and_groups_the_view_is_for():
    ca = {"spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                       "supplementalGroups": [7]}}}
    plan = security.plan(ca, {"name": "ca", "securityContext": {"readOnlyRootFilesystem": True}})
    assert (plan.uid, plan.gids, plan.read_only_root) == (65532, frozenset({65532, 7}), True)
    assert plan.argv == ("setpriv", "--reuid=65532", "--regid=65532", "--groups=7", "--")
    root = security.plan({"spec": {}}, {"name": "agent"})
    assert (root.uid, root.gids) == (0, frozenset())


def test_a_directory_covering_itself_brings_back_every_entry_of_its_staged_copy():
    cover = {"/tmp/tmp.X": ("/tmp/tmp.X",)}
    assert image.stage_count(cover) == 1
    loop = ('(umask 022 && for e in /s/0/* /s/0/.[!.]* /s/0/..?*; do [ -e "$e" ] || [ -L "$e" ] || continue; '
            't=/tmp/tmp.X/"${e##*/}"; if [ -L "$e" ]; then ln -s "$(readlink "$e")" "$t"; '
            'elif [ -d "$e" ]; then mkdir "$t" && mount -n --rbind "$e" "$t"; '
            'else : > "$t" && mount -n --bind "$e" "$t"; fi || exit 1; done)')
    assert image.mount_steps(cover, "/s", read_only=True) == [
        "mount -n --rbind /tmp/tmp.X /s/0", "mount -n -t tmpfs -o mode=0755 nodeagent-image /tmp/tmp.X", loop,
        "mount -n -o remount,ro /tmp/tmp.X"]
