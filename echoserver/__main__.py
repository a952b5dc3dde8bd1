"""python -m echoserver: run the command line (echoserver.cli.main)."""

from echoserver.cli import main

raise SystemExit(main())
