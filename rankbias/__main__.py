"""`python -m rankbias ...` is the `rankbias` command."""

from rankbias.cli.main import main

raise SystemExit(main())
