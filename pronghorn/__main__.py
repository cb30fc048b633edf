from pronghorn.cli.main import main

raise SystemExit(main())
