"""python -m bdiff.data: fetch, build or prepare token shards (bdiff.data.main)."""
import sys

from bdiff.data import main

sys.exit(main())
