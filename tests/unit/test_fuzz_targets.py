"""The fuzz targets (fuzz/targets.py) stay valid: each passes its seed corpus and a few
hundred random and mutated inputs without atheris, so a target broken by a change of the
code it drives fails here, not first in `make fuzz`."""

from __future__ import annotations

import random

import pytest

from fuzz import targets


def test_every_target_has_seeds() -> None:
    assert set(targets._seed_lists()) == set(targets.TARGETS)
    assert all(targets.seeds(name) for name in targets.TARGETS)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_target_over_seeds_and_random_inputs(name: str) -> None:
    target = targets.TARGETS[name]
    seeds = targets.seeds(name)
    rng = random.Random(name)
    for seed in seeds:
        target(seed)
    for i in range(300):
        if i % 2:  # a seed with a few bytes flipped, cut or extended
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            data = data[: rng.randint(0, len(data))] if rng.random() < 0.3 else data
            target(bytes(data) + rng.randbytes(rng.randint(0, 8)))
        else:
            target(rng.randbytes(rng.randint(0, 200)))
