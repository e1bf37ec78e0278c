from highspeed.cli import main

raise SystemExit(main())
