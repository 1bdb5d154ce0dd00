from dit_sparse.cli import main

raise SystemExit(main())
