import sys

from p2ptrain.p2pd.daemon import main

sys.exit(main())
