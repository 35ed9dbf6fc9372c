"""Enrolment of the node's meshed pods (in-pod mode): `enrolment` reconciles the model's
meshed pods with what is enrolled (capture maps, sk_lookup steering, in-pod listeners,
policy routing) and rolls back a half-done enrolment; `podns` finds a pod's network
namespace from its UID (kubelet's cgroup naming); `podrouting` sets the pod's policy
routing for delivered connections; `sockets` makes the listeners and upstream sockets
inside a pod's netns and holds the `PodContext` every relay gets.
"""
