from netplug.cli import main

raise SystemExit(main())
