"""Istio resources the waypoint translates, validated into typed form (see config.py)."""
