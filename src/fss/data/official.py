"""The official test scripts' episode streams, replayed draw for draw.

HSNet's ``test.py`` (juhongm999/hsnet) seeds numpy's global generator with 0
(``fix_randseed(0)``) right before its test loop and loads the test episodes with no
loader worker, in index order, so the episodes are one sequence of draws from a legacy
``RandomState(0)``. Every draw is ``np.random.choice(population, 1, replace=False)``: with
``replace=False`` the legacy generator shuffles a whole ``permutation(len(population))``
and keeps its first element, so each draw consumes a full permutation — replaying needs the
same population sizes in the same order, not just the same picks.

Per episode ``i`` (``n`` = length of the split's list):

- PASCAL-5i: the query is entry ``i mod n`` of the fold's ``val`` list (image, class);
  supports are drawn from the class's entries of that list (in list order, repeats kept)
  until ``K`` of them differ from the query (two supports may be the same image).
- COCO-20i: a class among the fold's 20 (``fold + 4 v``, v = 0..19), then the query among
  the class's images of ``val/fold<i>.pkl``, then the supports as for PASCAL.
- FSS-1000: the query is the ``i``-th test image (classes sorted, then each class's files
  sorted as strings); supports are drawn as numbers 1..10 naming ``<n>.jpg`` in the query's
  folder, until ``K`` differ from the query.

The functions here return names as the lists write them; ``fss.data.real`` maps them to
records. They take a generator so that tests can replay them against the official
dataset classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fss.utils.errors import ConfigError

# (class id, query name, support names in draw order)
Draw = tuple[int, str, list[str]]
FSS_IMAGES_PER_CLASS = 10


def _pick(rng: np.random.RandomState, population: Sequence) -> object:
    """One element, drawn as ``choice(population, 1, replace=False)[0]`` draws it."""
    return population[int(rng.choice(len(population), 1, replace=False)[0])]


def _supports(rng: np.random.RandomState, pool: Sequence[str], query: str, shot: int,
              where: str) -> list[str]:
    if all(name == query for name in pool):
        raise ConfigError(f"{where}: no support image other than the query {query!r}; the "
                          f"official sampling would never end (shot={shot})")
    supports: list[str] = []
    while len(supports) < shot:
        name = _pick(rng, pool)
        if name != query:
            supports.append(name)
    return supports


def hsnet_pascal_stream(pairs: Sequence[tuple[str, int]], shot: int, num_episodes: int,
                        seed: int = 0) -> list[Draw]:
    """HSNet's PASCAL-5i test episodes from the fold's ``val`` pairs (image id, 0-based
    class) in list order."""
    classwise: dict[int, list[str]] = {}
    for image_id, class_id in pairs:
        classwise.setdefault(class_id, []).append(image_id)
    rng = np.random.RandomState(seed)
    draws = []
    for index in range(num_episodes):
        query, class_id = pairs[index % len(pairs)]
        draws.append((class_id, query, _supports(rng, classwise[class_id], query, shot,
                                                 f"PASCAL class {class_id}")))
    return draws


def hsnet_coco_stream(classwise: dict[int, list[str]], class_ids: Sequence[int], shot: int,
                      num_episodes: int, seed: int = 0) -> list[Draw]:
    """HSNet's COCO-20i test episodes: ``class_ids`` in the official order (``fold + 4v``),
    ``classwise`` the fold's ``val`` pickle (class -> image paths)."""
    rng = np.random.RandomState(seed)
    draws = []
    for _ in range(num_episodes):
        class_id = int(_pick(rng, list(class_ids)))
        pool = classwise.get(class_id) or []
        if not pool:
            raise ConfigError(f"COCO class {class_id} has no image in HSNet's val list; the "
                              "official stream needs every class of the fold")
        query = _pick(rng, pool)
        draws.append((class_id, query, _supports(rng, pool, query, shot,
                                                 f"COCO class {class_id}")))
    return draws


def hsnet_fss_stream(queries: Sequence[tuple[str, int]], shot: int, num_episodes: int,
                     seed: int = 0) -> list[Draw]:
    """HSNet's FSS-1000 test episodes from the test images ``(class folder/file, class)``
    in the official order; names are ``<class folder>/<file>``."""
    rng = np.random.RandomState(seed)
    draws = []
    for index in range(num_episodes):
        query, class_id = queries[index % len(queries)]
        folder = query.rsplit("/", 1)[0]
        numbers = range(1, FSS_IMAGES_PER_CLASS + 1)
        supports: list[str] = []
        while len(supports) < shot:
            name = f"{folder}/{_pick(rng, numbers)}.jpg"
            if name != query:
                supports.append(name)
        draws.append((class_id, query, supports))
    return draws
