"""Config validation: each bad value is an error naming its key; YAML loading."""

from __future__ import annotations

import pytest

from scoring.config import RunConfig, load_yaml, make_config

BASE = {"input": "in", "output": "out", "run_id": "r1"}

BAD = [
    ("k", 0, ValueError),
    ("k", "8", TypeError),
    ("k", True, TypeError),
    ("kmeans_iters", 0, ValueError),
    ("seed", 1.5, TypeError),
    ("shard_rows", 0, ValueError),
    ("sample_size", 3, ValueError),  # below k
    ("metric", "dot", ValueError),
    ("strategy", "hardest", ValueError),
    ("keep_fraction", 0, ValueError),
    ("keep_fraction", 0.0, ValueError),
    ("keep_fraction", -0.5, ValueError),
    ("keep_fraction", 1.0000001, ValueError),
    ("keep_fraction", 2, ValueError),
    ("keep_fraction", True, ValueError),
    ("keep_fraction", "0.3", ValueError),
    ("keep_count", -1, ValueError),
    ("keep_count", 2.5, TypeError),
    ("workers", 0, ValueError),
    ("max_retries", -1, ValueError),
    ("run_id", "a/b", ValueError),
    ("run_id", "..x", ValueError),
    ("input", "", ValueError),
    ("id_column", "", ValueError),
    ("log_format", "xml", ValueError),
    ("quiet", "yes", TypeError),
    ("storage_options", [1], TypeError),
    ("run_id", 2026, TypeError),  # YAML `run_id: 2026`
    ("address", 5, TypeError),
    ("label_column", 3, TypeError),
    ("keep_fraction", float("nan"), ValueError),
]


@pytest.mark.parametrize("key,value,exc", BAD)
def test_bad_value_names_the_key(key, value, exc):
    settings = dict(BASE, k=4)
    settings[key] = value
    with pytest.raises(exc, match=f"'{key}'"):
        RunConfig(**settings)


def test_fraction_and_count_exclude_each_other():
    with pytest.raises(ValueError, match="keep_count"):
        RunConfig(**BASE, keep_fraction=0.5, keep_count=3)


@pytest.mark.parametrize("f,n,want", [(1, 10, 10), (0.3, 10, 3), (0.5, 7, 3), (1e-9, 10, 0)])
def test_n_keep_is_floor_of_fraction(f, n, want):
    assert RunConfig(**BASE, keep_fraction=f).n_keep(n) == want


def test_n_keep_count_and_default():
    assert RunConfig(**BASE, keep_count=4).n_keep(10) == 4
    assert RunConfig(**BASE, keep_count=40).n_keep(10) == 10
    assert RunConfig(**BASE).n_keep(9) == 4


def test_yaml_unknown_key_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("input: x\nkeep-fraction: 0.2\nkepp_fraction: 0.3\n")
    with pytest.raises(ValueError, match="unknown key 'kepp_fraction'"):
        load_yaml(str(p))


def test_yaml_dashes_and_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("input: x\noutput: y\nkeep-fraction: 0.2\nk: 16\nstorage_options: {anon: true}\n")
    cfg = make_config(load_yaml(str(p)))
    assert (cfg.keep_fraction, cfg.k, dict(cfg.storage_options)) == (0.2, 16, {"anon": True})
    assert cfg.run_id  # a timestamp by default


def test_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_yaml(str(tmp_path / "nope.yaml"))
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml(str(p))
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml(str(p))


def test_make_config_requires_input_and_names_source():
    with pytest.raises(ValueError, match="'input' is required"):
        make_config({"output": "o"})
    with pytest.raises(ValueError, match="my.yaml: config key 'k'"):
        make_config(dict(BASE, k=0), source="my.yaml")


def test_hash_ignores_where_it_runs_and_redacts_secrets():
    a = RunConfig(**BASE, storage_options={"key": "AKIA", "secret": "s", "client_kwargs": {}})
    b = RunConfig(**dict(BASE, output="elsewhere", run_id="r2"), workers=3)
    assert a.config_hash() == b.config_hash()
    assert RunConfig(**BASE, k=7).config_hash() != a.config_hash()
    red = a.redacted()["storage_options"]
    assert red["key"] == "***" and red["secret"] == "***"
