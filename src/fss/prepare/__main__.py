"""``python -m fss.prepare pascal|coco|fss1000 ...`` (see ``fss.prepare``)."""

from fss.prepare import main

main()
