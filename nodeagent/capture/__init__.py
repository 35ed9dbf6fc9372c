"""eBPF capture: the programs in bpf/ and everything user space does with them.

`loader.CaptureLoader` is the entry point (lifecycle, enrolment, original
destinations, inbound steering, stats); `structs` mirrors bpf/nodeagent.h; `errors`
holds the typed errors. The agent never imports bcc: compiler.py compiles and loads
in a short-lived child process and hands back the program fds.
"""
