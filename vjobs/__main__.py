from vjobs.cli import main

raise SystemExit(main())
