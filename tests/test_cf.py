"""recsft.cf: the collaborative-filtering residual (cross-fitted CF logits, the table's save/load, the head)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from recsft import cf
from recsft.io import DataError


def ratings(n_users=30, n_items=25, seed=0, user_ids=None, item_ids=None) -> pd.DataFrame:
    """Dense synthetic star ratings with real user and item effects (every user rates ~60% of the items)."""
    rng = np.random.default_rng(seed)
    bu, bi = rng.normal(0, 0.8, n_users), rng.normal(0, 0.8, n_items)
    u, i = np.nonzero(rng.random((n_users, n_items)) < 0.6)
    stars = np.clip(np.rint(3.5 + bu[u] + bi[i] + rng.normal(0, 0.5, len(u))), 1, 5)
    users = np.asarray(user_ids if user_ids is not None else np.arange(1, n_users + 1), dtype=object)
    items = np.asarray(item_ids if item_ids is not None else np.arange(1, n_items + 1), dtype=object)
    return pd.DataFrame({"user_id": users[u].tolist(), "movie_id": items[i].tolist(), "rating": stars,
                         "timestamp": np.arange(len(u))})


@pytest.fixture(scope="module")
def train():
    return ratings()


@pytest.fixture(scope="module")
def fitted(train):
    return cf.cross_fit_logits("biases", train, 4.0, seed=0)


def predicted(logits, table):
    """The out-of-fold predicted ratings behind cross-fitted logits (the calibration is affine)."""
    return (logits - table.intercept) / table.slope


def test_cross_fitting_is_out_of_fold(train, fitted):
    logits, table = fitted
    row = int(np.flatnonzero(train.rating.to_numpy() <= 2)[0])
    changed = train.copy()
    changed.loc[row, "rating"] = 5.0
    logits2, table2 = cf.cross_fit_logits("biases", changed, 4.0, seed=0)
    before, after = predicted(logits, table), predicted(logits2, table2)
    assert after[row] == pytest.approx(before[row], abs=1e-9)  # its own rating did not move its prediction
    assert np.abs(after - before).max() > 1e-3  # ...but it did move rows of other folds
    user, item = train.user_id[row], train.movie_id[row]
    assert table2.rating([user], [item])[0] > table.rating([user], [item])[0] + 1e-3  # the full fit sees it


def test_calibration_is_monotone_and_matches_the_like_rate(train, fitted):
    logits, table = fitted
    assert table.slope > 0 and table.like_threshold == 4.0
    users, items = train.user_id.to_numpy(), train.movie_id.to_numpy()
    np.testing.assert_array_equal(np.argsort(table.logit(users, items), kind="stable"),
                                  np.argsort(table.rating(users, items), kind="stable"))
    assert expit(logits).mean() == pytest.approx((train.rating >= 4).mean(), abs=2e-3)
    assert logits.dtype == np.float64 and len(logits) == len(train)


def test_unknown_users_and_items_use_the_known_parts():
    table = cf.fit_cf("mf", ratings(), 4.0, seed=0)
    g, bu, bi = table.global_bias, table.user_bias[0], table.item_bias[0]
    u, i = table.user_ids[0], table.item_ids[0]
    full = g + bu + bi + table.user_factors[0] @ table.item_factors[0]
    got = table.rating([u, u, "nobody", str(u)], [i, "nothing", i, "nothing"])  # "1" is not the id 1
    np.testing.assert_allclose(got, [full, g + bu, g + bi, g])
    assert table.logit([u], [i])[0] == pytest.approx(table.slope * full + table.intercept)
    users, items = table.vectors([u, "nobody"], [i, "nothing"])
    assert users.shape == items.shape == (2, table.user_factors.shape[1]) and table.user_factors.shape[1] > 0
    np.testing.assert_array_equal(users[0], table.user_factors[0])
    assert not users[1].any() and not items[1].any()
    assert cf.fit_cf("biases", ratings(), 4.0).vectors([u], [i])[0].shape == (1, 0)


@pytest.mark.parametrize("ids", ["int", "str"])
def test_save_load_round_trip(tmp_path, ids):
    n_users, n_items = 30, 25
    data = ratings(user_ids=None if ids == "int" else [f"u{k}" for k in range(n_users)],
                   item_ids=None if ids == "int" else [f"m{k}" for k in range(n_items)])
    table = cf.fit_cf("mf", data, 4.0, seed=3)
    table.build_id = "abc123"
    table.save(tmp_path)
    back = cf.CFTable.load(tmp_path)
    assert back.user_ids == table.user_ids and back.item_ids == table.item_ids
    assert {type(x) for x in back.user_ids + back.item_ids} == {int if ids == "int" else str}
    assert (back.kind, back.seed, back.build_id, back.like_threshold) == ("mf", 3, "abc123", 4.0)
    users, items = data.user_id.tolist() + ["?"], data.movie_id.tolist() + ["?"]
    np.testing.assert_array_equal(back.logit(users, items), table.logit(users, items))
    np.testing.assert_array_equal(back.vectors(users, items)[1], table.vectors(users, items)[1])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="cf_residual.json: not found"):
        cf.CFTable.load(tmp_path)
    cf.fit_cf("biases", ratings(), 4.0).save(tmp_path / "a")
    cf.fit_cf("biases", ratings(seed=1), 4.0).save(tmp_path / "b")
    (tmp_path / "a" / cf.ARRAYS_FILE).write_bytes((tmp_path / "b" / cf.ARRAYS_FILE).read_bytes())
    with pytest.raises(DataError, match="cf_residual.safetensors: not the file"):
        cf.CFTable.load(tmp_path / "a")
    meta = tmp_path / "b" / cf.META_FILE
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "user_ids": [1.5]}))
    with pytest.raises(DataError, match="must be int or str"):
        cf.CFTable.load(tmp_path / "b")
    meta.write_text("{not json")
    with pytest.raises(DataError, match="cf_residual.json: corrupt") as e:
        cf.CFTable.load(tmp_path / "b", fix="re-run the training")
    assert "\n" not in str(e.value) and str(e.value).endswith("re-run the training")


@pytest.mark.parametrize("kind,frame,message", [("svd", None, "CF kind 'svd'"),
                                                ("biases", "no_rating", "columns \\['rating'\\] missing"),
                                                ("biases", "all_liked", "one side of like_threshold")])
def test_bad_input(kind, frame, message):
    data = ratings()
    if frame == "no_rating":
        data = data.drop(columns="rating")
    if frame == "all_liked":
        data = data.assign(rating=5.0)
    with pytest.raises(DataError, match=message):
        cf.fit_cf(kind, data, 4.0)


def test_residual_head_starts_at_the_cf_ranking_and_passes_gradients(tmp_path):
    import torch

    head = cf.ResidualHead()
    assert head.a.item() == pytest.approx(cf.INIT_A) and head.b.item() == 0.0 and head.a.dtype == torch.float32
    c = torch.arange(10, dtype=torch.float64).flip(0)  # CF logits one apart
    margin = (torch.rand(10, generator=torch.Generator().manual_seed(0)) * 80 - 40).to(torch.bfloat16).requires_grad_()
    z = head(c, margin)  # |a * margin| <= 0.4 < half the gap: the CF order survives
    assert z.dtype == torch.float32 and torch.equal(torch.argsort(z), torch.argsort(c.float()))
    torch.nn.functional.binary_cross_entropy_with_logits(z, (torch.arange(10) % 2).float()).backward()
    assert head.a.grad.abs() > 0 and head.b.grad.abs() > 0 and (margin.grad.abs() > 0).all()
    with torch.no_grad():
        head.a.fill_(0.5), head.b.fill_(-1.25)
    head.save(tmp_path)
    back = cf.ResidualHead.load(tmp_path)
    assert (back.a.item(), back.b.item()) == (0.5, -1.25)
    with pytest.raises(DataError, match="cf_head.safetensors: not found"):
        cf.ResidualHead.load(tmp_path / "none")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    import prepare_data

    out = tmp_path_factory.mktemp("cf_data")
    prepare_data.main(prepare_data.parse_args(["--out-dir", str(out), "--max-users", "30"]))
    return out


def test_lookups_cover_training_interactions_only(prepared):
    from recsft import movielens

    lookup, table = cf.cf_lookups(prepared, "biases")
    data = movielens.load_prepared(prepared)
    held = {(e["user_id"], e["candidate_movie_id"]) for s in ("eval", "test") for e in data.splits[s]}
    train = {(e["user_id"], e["candidate_movie_id"]) for e in data.splits["train"]}
    assert train <= set(lookup) and not held & set(lookup)
    assert len(lookup) + len(held) == len(data.ratings)
    assert table.build_id == json.loads((prepared / "stats.json").read_text())["build_id"]


def test_cf_baseline_rows(prepared, tmp_path):
    import baselines

    results = baselines.main(baselines.parse_args(["--data_dir", str(prepared), "--output_dir", str(tmp_path),
                                                   "--models", "biases,cf-biases", "--predictions"]))
    rows = [json.loads(line) for line in (tmp_path / "cf-biases" / "predictions.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (prepared / "test_raw.jsonl").read_text().splitlines()]
    assert [(r["user_id"], r["candidate_movie_id"]) for r in rows] == \
        [(e["user_id"], e["candidate_movie_id"]) for e in test]
    _, table = cf.cf_lookups(prepared, "biases")
    expected = expit(table.logit([r["user_id"] for r in rows], [r["candidate_movie_id"] for r in rows]))
    np.testing.assert_allclose([r["p_yes"] for r in rows], expected)
    summary = json.loads((tmp_path / "cf-biases" / "metrics_summary.json").read_text())
    assert summary["auc"] == results["CF residual alone: biases (recsft.cf)"]["auc"] > 0.5
