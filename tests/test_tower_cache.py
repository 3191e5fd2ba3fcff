"""A frozen vision tower's outputs, cached per image during a training stage (`tinymed.train.tower_cache`):
the same outputs as the tower, each image through the tower once, nothing left patched, and training with
the cache the same as without it."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from tinymed.models import TinyConfig, build_tiny_model
from tinymed.train import finetune
from tinymed.train.tower_cache import cached_tower
from test_finetune import ALIGN, INSTRUCT, _config, data_dir  # noqa: F401  (data_dir is a fixture)


@pytest.fixture(scope="module")
def tower():
    model, _ = build_tiny_model(["is there a lesion? yes no"] * 20, TinyConfig(image_size=32, vision_layers=1))
    return model.model.vision_tower.eval()


def _same(a, b) -> bool:
    assert a.keys() == b.keys()
    return all(all(torch.equal(x, y) for x, y in zip(a[k], b[k])) if isinstance(a[k], tuple) else torch.equal(a[k], b[k])
               for k in a)


def _call(tower, images):
    with torch.no_grad():
        return tower(images, return_dict=True, output_hidden_states=True)


def test_cached_tower_answers_as_the_tower_and_runs_each_image_once(tower):
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    state = {k: v.clone() for k, v in tower.state_dict().items()}
    expected = _call(tower, images)
    with cached_tower(tower, 1 << 20) as cache:
        first = _call(tower, images)
        shuffled = _call(tower, images[[3, 1, 0, 2]])
        with_new = _call(tower, torch.cat([images[:2], torch.randn(1, 3, 32, 32)]))
        assert cache.computed == 5 and cache.bytes > 0
        new = torch.randn(1, 3, 32, 32)
        repeated = _call(tower, torch.cat([new, new, images[:1]]))  # an image twice in one batch: once through
        assert cache.computed == 6 and torch.equal(repeated.last_hidden_state[0], repeated.last_hidden_state[1])
        other_options = tower(images[:1], return_dict=True)  # another call signature is another entry
        assert cache.computed == 7 and "hidden_states" not in other_options
    assert _same(first, expected)
    assert _same(shuffled, _call(tower, images[[3, 1, 0, 2]]))
    assert torch.equal(with_new.last_hidden_state[:2], expected.last_hidden_state[:2])
    assert "forward" not in vars(tower)  # unpatched: the class's forward again
    assert tower.state_dict().keys() == state.keys() and all(torch.equal(state[k], v) for k, v in tower.state_dict().items())


def test_no_budget_leaves_the_tower_alone_and_a_full_cache_still_answers(tower):
    images = torch.randn(3, 3, 32, 32)
    with cached_tower(tower, 0) as cache:
        assert cache is None and "forward" not in vars(tower)
    with cached_tower(tower, 1) as cache:  # nothing fits: every image through the tower every time
        for _ in range(2):
            assert _same(_call(tower, images), _call_plain(tower, images))
        assert cache.computed == 6 and cache.bytes == 0


def _call_plain(tower, images):
    with torch.no_grad():
        return type(tower).forward(tower, images, return_dict=True, output_hidden_states=True)


def test_training_with_the_tower_cache_matches_training_without(data_dir, tmp_path, monkeypatch):  # noqa: F811
    caches = []

    @contextmanager
    def recorded(tower, max_bytes):
        with cached_tower(tower, max_bytes) as cache:
            caches.append(cache)
            yield cache

    monkeypatch.setattr("tinymed.train.loop.cached_tower", recorded)
    losses = {}
    for mb in (0, 64):
        result = finetune(_config(data_dir, tmp_path / str(mb), [ALIGN, INSTRUCT], tower_cache_mb=mb), progress=False)
        losses[mb] = [json.loads(line)["loss"] for line in result.log_path.read_text().splitlines()]
    assert len(losses[0]) == len(losses[64]) == 5
    assert losses[64] == pytest.approx(losses[0], rel=1e-4)
    # the 24 readable images are 3 colours (and the unreadable row one placeholder): of the 8 and 12 images
    # the stages see, at most 4 distinct ones go through the tower
    assert caches[:2] == [None, None] and all(3 <= c.computed <= 4 for c in caches[2:])
