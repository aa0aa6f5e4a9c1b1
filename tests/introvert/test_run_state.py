"""The run directory under misuse: settings that cannot train, foreign directories, locks, interruptions, reruns."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import (
    TINY_EXPERT,
    assert_one_line_error,
    assert_run_loads,
    cluster_args,
    make_corpus,
    make_read_only,
    restore_writable,
    run_cli,
    tree,
)
from upcycle.cli import main
from upcycle.errors import UserError
from upcycle.introvert.config import ExpertConfig


@pytest.mark.parametrize(("field", "value"), [("tokens_per_expert", 0), ("tokens_per_expert", -5), ("batch_size", 0),
                                              ("block_size", 0), ("block_size", 1), ("lr", 0.0),
                                              ("warmup_steps", -1)])
def test_expert_settings_that_cannot_train_are_refused(field, value):
    with pytest.raises(UserError, match=f"--expert.{field} must be"):
        ExpertConfig(**{field: value})


# -- a small trained run that each test copies -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def clustered(tmp_path_factory, corpus, tiny_llama_dir) -> Path:
    run = tmp_path_factory.mktemp("runs") / "clustered"
    assert main(cluster_args(corpus, tiny_llama_dir, run)) == 0
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clustered) -> Path:
    run = tmp_path_factory.mktemp("runs") / "trained"
    shutil.copytree(clustered, run)
    assert main(["introvert", "train-experts", str(run), *TINY_EXPERT]) == 0
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# -- item 10: cluster --out never takes over a directory that is not a run ---------------------------------------------
def test_cluster_refuses_a_foreign_directory_and_leaves_it_untouched(tmp_path, capsys, corpus, tiny_llama_dir):
    out = tmp_path / "mine"
    (out / "clusters").mkdir(parents=True)
    (out / "clusters" / "my-notes.txt").write_text("not upcycle's")
    (out / "data.csv").write_text("a,b\n")
    before = tree(out)
    code, _, err = run_cli(capsys, cluster_args(corpus, tiny_llama_dir, out))
    assert_one_line_error(code, err, "not empty and not a run directory")
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == ["clusters", "data.csv"]


def test_cluster_takes_an_empty_directory_and_the_leftovers_of_its_own_interrupted_run(tmp_path, capsys, corpus,
                                                                                       tiny_llama_dir):
    out = tmp_path / "out"
    (out / ".clusters.k3j9x.tmp" / "embedder").mkdir(parents=True)  # what kill -9 during `cluster` leaves
    (out / ".upcycle-lock").write_text("")
    code, _, err = run_cli(capsys, cluster_args(corpus, tiny_llama_dir, out))
    assert code == 0, err
    assert not (out / ".clusters.k3j9x.tmp").exists()
    assert_run_loads(out)


# -- item 11: one writer per run ---------------------------------------------------------------------------------------
def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process that holds the run's lock until it is killed."""
    import upcycle

    script = (f"from upcycle.introvert.run import Run\nimport time\nwith Run({str(run)!r}).lock('train-experts'):\n"
              "    print('locked', flush=True)\n    time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(upcycle.__file__).parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_train_experts_is_told_who_holds_the_run(tmp_path, capsys, trained):
    run = copy_of(trained, tmp_path)
    holder = _hold_lock(run)
    try:
        before = tree(run)
        code, _, err = run_cli(capsys, ["introvert", "train-experts", run, *TINY_EXPERT])
        assert_one_line_error(code, err, f"is in use by process {holder.pid} on ")
        assert "train-experts" in err and tree(run) == before
        code, _, err = run_cli(capsys, ["introvert", "evaluate", run])
        assert_one_line_error(code, err, f"process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, capsys, trained):
    run = copy_of(trained, tmp_path)
    holder = _hold_lock(run)
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: its record stays in the lock file
    holder.wait()
    assert str(holder.pid) in (run / ".upcycle-lock").read_text()
    code, out, err = run_cli(capsys, ["introvert", "train-experts", run, *TINY_EXPERT])
    assert code == 0 and "0 experts trained, 2 already done" in out, err
    (run / ".upcycle-lock").write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere"}))  # a record, no lock
    assert run_cli(capsys, ["introvert", "train-experts", run, *TINY_EXPERT])[0] == 0


# -- item 12: full disks and read-only runs ----------------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "clusters/centroids.npy")


def test_a_full_disk_during_cluster_leaves_no_run_and_a_rerun_works(tmp_path, capsys, corpus, tiny_llama_dir,
                                                                    monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr("upcycle.introvert.clustering.corpus.fit_and_label", _disk_full)
        code, _, err = run_cli(capsys, cluster_args(corpus, tiny_llama_dir, out))
    assert_one_line_error(code, err, "No space left on device")
    assert not (out / "run.json").exists() and not (out / "clusters").exists()
    assert run_cli(capsys, cluster_args(corpus, tiny_llama_dir, out))[0] == 0
    assert_run_loads(out)


def test_a_full_disk_while_writing_run_json_keeps_the_previous_clusters(tmp_path, capsys, clustered, corpus,
                                                                        tiny_llama_dir, monkeypatch):
    from upcycle import io

    run = copy_of(clustered, tmp_path)
    before = tree(run)
    real = io.write_json

    def full_at_run_json(path, obj):
        if Path(path).name == "run.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)

    monkeypatch.setattr("upcycle.introvert.clustering.corpus.write_json", full_at_run_json)
    monkeypatch.setattr("upcycle.introvert.run.write_json", full_at_run_json)
    code, _, err = run_cli(capsys, cluster_args(corpus, tiny_llama_dir, run, clusters=3))  # other settings: refit
    assert_one_line_error(code, err, "No space left on device")
    assert tree(run) == before  # clusters/ and run.json both as they were
    assert_run_loads(run)


@pytest.mark.parametrize("command", ["train-experts", "evaluate"])
def test_a_read_only_run_fails_before_any_work(tmp_path, capsys, trained, monkeypatch, command):
    run = copy_of(trained, tmp_path)
    if command == "train-experts":
        shutil.rmtree(run / "experts" / "expert-00001")  # there is work left to do
    monkeypatch.setattr("upcycle.models.base.load_base", _no_work)
    monkeypatch.setattr("upcycle.introvert.evaluate.load_base", _no_work)
    make_read_only(monkeypatch, run)
    try:
        code, _, err = run_cli(capsys, ["introvert", command, run])
    finally:
        restore_writable(run)
    assert_one_line_error(code, err, f"cannot write to {run}")


def _no_work(*args, **kwargs):
    raise AssertionError("the base model was loaded: the command started working on a run it cannot write")


# -- item 13: interruptions and reruns ---------------------------------------------------------------------------------
def test_stale_temporaries_of_a_killed_save_are_removed_on_the_next_run(tmp_path, capsys, trained):
    run = copy_of(trained, tmp_path)
    experts = run / "experts"
    (experts / ".expert-00001.a8f3k2.tmp").mkdir()  # kill -9 inside atomic_directory
    (experts / ".expert-00001.a8f3k2.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (experts / ".expert-00000.old-4242").mkdir()
    (run / ".run.json.q1w2e3.tmp").write_text("{")
    (experts / "my-notes.txt").write_text("kept")  # not ours: never removed
    code, _, err = run_cli(capsys, ["introvert", "train-experts", run, *TINY_EXPERT])
    assert code == 0, err
    assert sorted(p.name for p in experts.iterdir()) == ["expert-00000", "expert-00001", "my-notes.txt"]
    assert not (run / ".run.json.q1w2e3.tmp").exists()
    assert_run_loads(run, experts=2)


def test_an_expert_without_adapter_config_is_trained_again(tmp_path, capsys, trained):
    from upcycle.introvert.run import Run

    run = copy_of(trained, tmp_path)
    (run / "experts" / "expert-00001" / "adapter_config.json").unlink()
    assert Run(run).expert_ids() == ["expert-00000"]  # not counted as done
    code, out, err = run_cli(capsys, ["introvert", "train-experts", run, *TINY_EXPERT])
    assert code == 0 and "1 experts trained, 1 already done" in out, err
    assert_run_loads(run, experts=2)


def test_rerunning_cluster_restores_deleted_centroids(tmp_path, capsys, trained, corpus, tiny_llama_dir):
    run = copy_of(trained, tmp_path)
    centroids = (run / "clusters" / "centroids.npy").read_bytes()
    (run / "clusters" / "centroids.npy").unlink()
    code, _, err = run_cli(capsys, cluster_args(corpus, tiny_llama_dir, run))
    assert code == 0, err
    assert (run / "clusters" / "centroids.npy").read_bytes() == centroids  # the same clusters the experts know
    assert_run_loads(run, experts=2)


def test_train_experts_with_other_settings_on_a_trained_run_is_refused(tmp_path, capsys, trained):
    run = copy_of(trained, tmp_path)
    before = tree(run)
    other = ["--expert.tokens_per_expert", "1024", "--expert.batch_size", "2", "--expert.block_size", "64"]
    code, _, err = run_cli(capsys, ["introvert", "train-experts", run, *other])
    assert_one_line_error(code, err, "was trained with --expert.tokens_per_expert 512")
    assert tree(run) == before  # run.json still describes the training that happened
    assert json.loads((run / "run.json").read_text())["experts"]["config"]["tokens_per_expert"] == 512


def test_an_interrupted_train_experts_resumes_with_the_same_settings(tmp_path, capsys, clustered, monkeypatch):
    from upcycle.training import lora

    run = copy_of(clustered, tmp_path)
    real, calls = lora.train_lora_adapter, []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("upcycle.introvert.experts.train_lora_adapter", interrupted_second)
        assert run_cli(capsys, ["introvert", "train-experts", run, *TINY_EXPERT])[0] == 130
    code, out, err = run_cli(capsys, ["introvert", "train-experts", run, *TINY_EXPERT])
    assert code == 0 and "1 experts trained, 1 already done" in out, err
    assert_run_loads(run, experts=2)
