"""The lab: Kubernetes-shaped YAML run on one Linux machine.

Each Node is a network namespace, each Pod a network namespace plus a cgroup (named the
way kubelet names it) on its node, each container `command` a process inside it. Nodes
link through a fabric namespace the lab makes, so nothing of the lab touches the
machine's own network namespace. `layout` names every kernel object and path a lab
makes; `spec` validates lab files; `ipam` places pods and picks addresses; `topology`,
`services`, `dns` and `cgroups` build the kernel side; `state` keeps the state
directory; `supervisor` runs the processes; `lifecycle`/`teardown` bring a lab up and
down; `cli` is `nodeagent lab`.
"""
