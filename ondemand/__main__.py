from ondemand.cli import main

raise SystemExit(main())
