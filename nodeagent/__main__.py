"""`python -m nodeagent` is the `nodeagent` command."""

from nodeagent.cli import main

raise SystemExit(main())
