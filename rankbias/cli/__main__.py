"""`python -m rankbias.cli ...` is the `rankbias` command."""

from rankbias.cli.main import main

raise SystemExit(main())
