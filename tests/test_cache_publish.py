"""Two processes (DDP ranks) that build the same preprocessing cache at once both end up with it."""

from __future__ import annotations

import threading

from conftest import write_data


def test_two_builders_publishing_the_same_cache_both_succeed(qwen3_tokenizer, tmp_path, monkeypatch):
    from recsft import preprocess

    train, _ = write_data(tmp_path / "data", n_train=12, n_eval=1)
    cache = tmp_path / "cache"
    real_rename = preprocess.os.rename
    both_ready = threading.Barrier(2, timeout=60)

    def rename_together(src, dst):  # both builders reach the publish step before either publishes
        both_ready.wait()
        return real_rename(src, dst)

    monkeypatch.setattr(preprocess.os, "rename", rename_together)
    results, errors = [None, None], []

    def build(i):
        try:
            results[i] = preprocess.load_or_build("train", train, qwen3_tokenizer, 160, None, str(cache))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results[0]["input_ids"] == results[1]["input_ids"] and len(results[0]) == 12
    published = [p.name for p in cache.iterdir()]
    assert len(published) == 1 and published[0].startswith("train_preprocessed-"), published  # no tmp left
