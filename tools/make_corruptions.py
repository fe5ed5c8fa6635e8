"""Write a corrupted copy of a clean test set: ``python -m kdzoo.corruptions`` as a script.

    python tools/make_corruptions.py FashionMNIST --out /work/data   # -> /work/data/FashionMNIST-C

See ``python tools/make_corruptions.py --help`` and :mod:`kdzoo.corruptions`.
"""

from kdzoo.corruptions.__main__ import main

if __name__ == "__main__":
    main()
