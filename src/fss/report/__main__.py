"""``python -m fss.report <multirun dir>``: see :mod:`fss.report.cli`."""

from fss.report.cli import main

if __name__ == "__main__":
    main()
