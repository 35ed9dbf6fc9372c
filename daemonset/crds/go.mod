// Pins the Istio API release whose published CRDs daemonset/ installs (see README.md here).
module nodeagent.local/daemonset/crds

go 1.23

require istio.io/api v1.28.3
