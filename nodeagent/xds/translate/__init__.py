"""Model + validated Istio configuration → one node's Envoy resources (see build.py)."""
