"""tests/soak is a command (`.venv/bin/python tests/soak/soak.py`), not tests: pytest
collects nothing here, so no test run ever starts the soak's lab."""

collect_ignore_glob = ["*.py"]
