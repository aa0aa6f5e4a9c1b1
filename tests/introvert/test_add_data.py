"""`upcycle introvert add-data`: a run built on code grows with prose; only changed experts are trained."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import save_tiny_llama
from tests.run_helpers import TINY_EXPERT, assert_one_line_error, assert_run_loads, make_corpus, run_cli, tree
from upcycle.cli import main
from upcycle.data.corpus import stdlib_root


def make_new_corpus(root: Path) -> Path:
    """Corpus B: a few more chunks of json code (near corpus A) and English prose A has none of (the Python
    license, IDLE's news and readme files)."""
    root.mkdir(parents=True)
    lines = (stdlib_root() / "json" / "__init__.py").read_text().splitlines()
    for i in range(0, 400, 80):
        (root / f"json_init_{i}.py").write_text("\n".join(lines[i:i + 80]))
    texts = [(stdlib_root() / "LICENSE.txt").read_text()] + [
        (stdlib_root() / "idlelib" / name).read_text(errors="replace") for name in ("NEWS2x.txt", "README.txt")]
    for n, text in enumerate(texts):
        for i in range(0, min(len(text), 24_000), 2000):
            (root / f"prose_{n}_{i}.txt").write_text(text[i:i + 2000])
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, one_torch_thread):
    """(run before add-data, the same run after adding corpus B, corpus B)."""
    root = tmp_path_factory.mktemp("add-data")
    corpus, new = make_corpus(root / "a"), make_new_corpus(root / "b")
    run = root / "run"
    assert main(["introvert", "cluster", "--data", str(corpus), "--base", str(tiny_llama_dir), "--clustering.clusters",
                 "3", "--splits.validation", "0.15", "--out", str(run)]) == 0
    assert main(["introvert", "train-experts", str(run), *TINY_EXPERT]) == 0
    before = root / "before"
    shutil.copytree(run, before)
    assert main(["introvert", "add-data", str(run), "--data", str(new)]) == 0
    return before, run, new


def test_new_domain_forms_new_clusters_and_near_documents_join(runs):
    before, run, _ = runs
    meta = json.loads((run / "run.json").read_text())
    record = meta["generations"][1]
    old_k = json.loads((before / "run.json").read_text())["clusters"]["k"]
    assert record["new_clusters"] >= 1 and meta["clusters"]["k"] == old_k + record["new_clusters"]
    labels = json.loads((run / "clusters" / "documents.json").read_text())["train"]
    added = {doc: c for doc, c in labels.items() if doc.startswith("g1/")}
    in_new = [doc for doc, c in added.items() if c >= old_k]
    code = [doc for doc in added if doc.endswith(".py")]
    assert in_new and sum(doc.endswith(".txt") for doc in in_new) / len(in_new) >= 0.8  # new clusters are prose
    assert code and all(added[doc] < old_k for doc in code)  # json code joins the old clusters
    assert record["joined"] == sum(c < old_k for c in added.values())
    new_experts = [f"expert-{c:05d}" for c in range(old_k, meta["clusters"]["k"])]
    assert set(new_experts) <= set(record["experts_trained"])
    assert_run_loads(run, experts=meta["clusters"]["k"])


def test_only_changed_experts_are_trained_and_the_rest_are_untouched(runs):
    before, run, _ = runs
    record = json.loads((run / "run.json").read_text())["generations"][1]
    old_k = json.loads((before / "run.json").read_text())["clusters"]["k"]
    grown = np.bincount([c for d, c in json.loads((run / "clusters" / "documents.json").read_text())["train"].items()
                         if d.startswith("g1/") and c < old_k], minlength=old_k)
    sizes = json.loads((before / "run.json").read_text())["clusters"]["sizes"]
    changed = {f"expert-{c:05d}" for c in range(old_k) if grown[c] > 0.2 * sizes[c]}
    assert changed == {e for e in record["experts_trained"] if int(e[-5:]) < old_k}
    unchanged = [f"expert-{c:05d}" for c in range(old_k) if f"expert-{c:05d}" not in changed]
    assert unchanged, "the fixture should leave at least one cluster unchanged"
    for expert in unchanged:
        assert tree(before / "experts" / expert) == tree(run / "experts" / expert)
    for expert in changed:  # continued from the adapter it had, on the new share of its tokens
        meta = json.loads((run / "experts" / expert / "train.json").read_text())
        assert meta["mode"] == "continue" and meta["previous_tokens"] > 0 and meta["tokens"] < meta["previous_tokens"]
    old, new = np.load(before / "clusters" / "centroids.npy"), np.load(run / "clusters" / "centroids.npy")
    for c in range(old_k):  # unchanged centroids stay bit-exact; those that received documents move
        assert np.array_equal(old[c], new[c]) == (grown[c] == 0)


def test_rerun_with_the_same_content_does_nothing(runs, capsys, tmp_path):
    _, run, new = runs
    state = tree(run)
    copy = tmp_path / "same"
    shutil.copytree(new, copy)  # same content elsewhere: the hash, not the path, decides
    code, out, _ = run_cli(capsys, ["introvert", "add-data", run, "--data", copy])
    assert code == 0 and "already added as generation 1" in out
    assert tree(run) == state


def test_an_interrupted_add_data_resumes_and_shows_nothing_half_done(runs, tmp_path, monkeypatch, capsys):
    before, grown, new = runs
    run = tmp_path / "run"
    shutil.copytree(before, run)
    from upcycle.introvert import growth

    real, calls = growth.train_changed_expert, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(growth, "train_changed_expert", fail_second)
    code, _, err = run_cli(capsys, ["introvert", "add-data", run, "--data", new])
    assert code != 0 and "rerun the same command to continue" in err
    assert tree(run / "clusters") == tree(before / "clusters")  # readers still see the old run
    assert json.loads((run / "run.json").read_text()) == json.loads((before / "run.json").read_text())
    assert (run / growth.PENDING / "plan.json").is_file()
    monkeypatch.setattr(growth, "train_changed_expert", real)
    code, out, _ = run_cli(capsys, ["introvert", "add-data", run, "--data", new])
    assert code == 0 and "generation 1" in out and not (run / growth.PENDING).exists()
    assert np.array_equal(np.load(run / "clusters" / "centroids.npy"), np.load(grown / "clusters" / "centroids.npy"))
    assert sorted(os.listdir(run / "experts")) == sorted(os.listdir(grown / "experts"))


def test_bad_input_gets_one_line_errors(runs, tmp_path, capsys, tiny_tokenizer):
    from upcycle.introvert.run import Run

    before, _, new = runs
    run = tmp_path / "run"
    shutil.copytree(before, run)
    state = tree(run)
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, ["introvert", "add-data", run, "--data", tmp_path / "empty"])
    assert_one_line_error(code, err, "no usable text documents")
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    code, _, err = run_cli(capsys, ["introvert", "add-data", run, "--data", ids])
    assert_one_line_error(code, err, "token ids")
    other = save_tiny_llama(tmp_path / "other-base", tiny_tokenizer, seed=1)
    code, _, err = run_cli(capsys, ["introvert", "add-data", run, "--data", new, "--base", other])
    assert_one_line_error(code, err, "not the base this run's experts were trained on")
    code, _, err = run_cli(capsys, ["introvert", "add-data", run])
    assert_one_line_error(code, err, "--data is required")
    with Run.open(run).lock("train-experts"):  # a run being trained
        code, _, err = run_cli(capsys, ["introvert", "add-data", run, "--data", new])
    assert_one_line_error(code, err, "is in use by")
    corpus = json.loads((run / "run.json").read_text())["data"]
    code, out, _ = run_cli(capsys, ["introvert", "add-data", run, "--data", corpus])  # the run's own data
    assert code == 0 and "already added as generation 0" in out
    assert tree(run) == state  # none of these changed anything


def test_a_served_router_picks_up_grown_centroids_without_restart(runs, tmp_path):
    from upcycle.introvert.serving import served_run

    before, grown, _ = runs
    run = tmp_path / "run"
    shutil.copytree(before, run)
    router = served_run(run).router
    waiting = served_run(run).router
    waiting.settle_s = 3600.0
    old = len(router.experts)
    shutil.copytree(grown / "clusters", run / ".clusters.new")
    os.replace(run / "clusters", run / ".clusters.old")  # as atomic_directory swaps it
    os.replace(run / ".clusters.new", run / "clusters")
    k = json.loads((grown / "run.json").read_text())["clusters"]["k"]
    router.settle_s = 0.0
    assert old < k and len(router.experts) == k and len(router.route(["Permission is hereby granted"])) == 1
    assert len(waiting.experts) == old  # adopted only once the watcher has had time to register the new experts
