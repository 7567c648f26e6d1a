from skippipe.cli import main

raise SystemExit(main())
