"""The CLI under misuse, as a matrix: each case runs one `upcycle` command on a prepared directory and asserts the exit
code, that any error is one line without a traceback, and that the run still loads afterwards (or, where the
command must not create one, that there is none).

Cases are data (`Case`); what a case does to the directory first is a small function of `Ctx`. The shared runs are
built once per module with the tiny random Llama and the tf-idf embedder, and each case works on its own copy.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class Ctx:
    """What a case's `prepare` and `check` work with."""

    run: Path  # the run directory of the case (a copy of a shared run, or not there yet)
    tmp: Path
    corpus: Path
    base: Path
    monkeypatch: pytest.MonkeyPatch
    before: dict[str, str] | None = None  # tree(run) before the command, when the case checks it is unchanged
    cleanups: list[Callable[[], None]] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """One command line and what must come of it. `argv` may use {run}, {tmp}, {corpus} and {base}."""

    id: str
    argv: tuple[str, ...]
    code: int = 2
    needle: str = ""  # text the one-line error must contain
    start: str = "trained"  # the shared run copied to {run} first: trained, clustered or none
    prepare: Callable[[Ctx], None] | None = None
    loads: bool | None = True  # the run loads afterwards; False: there is no run.json; None: broken on purpose
    check: Callable[[Ctx], None] | None = None


CLUSTER = ("introvert", "cluster", "--data", "{corpus}", "--base", "{base}", "--clustering.clusters", "2",
           "--clustering.embedder", "tfidf", "--out", "{run}")
TRAIN = ("introvert", "train-experts", "{run}", *TINY_EXPERT)


def cluster_with(*extra: str, data: str = "{corpus}") -> tuple[str, ...]:
    """The shared cluster command with `extra` flags (later flags win) and other --data."""
    argv = list(CLUSTER)
    argv[argv.index("--data") + 1] = data
    return (*argv, *extra)


def train_with(*extra: str) -> tuple[str, ...]:
    return (*TRAIN, *extra)


# -- what cases do to their directory first ----------------------------------------------------------------------------
def foreign_directory(ctx: Ctx) -> None:
    (ctx.run / "clusters").mkdir(parents=True)
    (ctx.run / "clusters" / "mine.txt").write_text("the user's")
    (ctx.run / "notes.md").write_text("the user's")
    ctx.before = tree(ctx.run)


def file_in_the_way(ctx: Ctx) -> None:
    ctx.run.write_text("a file")


def empty_directory(ctx: Ctx) -> None:
    ctx.run.mkdir()


def empty_data_directory(ctx: Ctx) -> None:
    (ctx.tmp / "empty").mkdir()


def jsonl(*lines: str) -> Callable[[Ctx], None]:
    """Write {tmp}/data.jsonl: the corpus's documents as rows, then `lines`."""
    def write(ctx: Ctx) -> None:
        rows = [json.dumps({"text": p.read_text(), "body": p.read_text()}) for p in sorted(ctx.corpus.iterdir())]
        (ctx.tmp / "data.jsonl").write_text("\n".join([rows[0], *lines, *rows[1:]]) + "\n")
    return write


def delete(*names: str) -> Callable[[Ctx], None]:
    def remove(ctx: Ctx) -> None:
        for name in names:
            path = ctx.run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return remove


def snapshot(ctx: Ctx) -> None:
    ctx.before = tree(ctx.run)


def disk_full_in(target: str, name: str | None = None) -> Callable[[Ctx], None]:
    """`target` (a module attribute) raises ENOSPC, as a full disk would, for files called `name` (any if None)."""
    def patch(ctx: Ctx) -> None:
        module, attribute = target.rsplit(".", 1)
        real = getattr(__import__(module, fromlist=[attribute]), attribute)

        def full(*args, **kwargs):
            path = str(args[0]) if args else ""
            if name is None or Path(path).name == name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return real(*args, **kwargs)

        ctx.monkeypatch.setattr(target, full)
        if ctx.run.exists():
            ctx.before = tree(ctx.run)
    return patch


def read_only(ctx: Ctx) -> None:
    ctx.before = tree(ctx.run)
    make_read_only(ctx.monkeypatch, ctx.run)
    ctx.monkeypatch.setattr("upcycle.models.base.load_base", _no_work)
    ctx.monkeypatch.setattr("upcycle.introvert.evaluate.load_base", _no_work)


def unwritable_parent(ctx: Ctx) -> None:
    read_only(Ctx(ctx.tmp, ctx.tmp, ctx.corpus, ctx.base, ctx.monkeypatch))


def _no_work(*args, **kwargs):
    raise AssertionError("the base was loaded: the command started working where it cannot write")


def locked_by_another_process(ctx: Ctx) -> None:
    import upcycle

    script = (f"from upcycle.introvert.run import Run\nimport time\nwith Run({str(ctx.run)!r}).lock('train-experts'):"
              "\n    print('locked', flush=True)\n    time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(upcycle.__file__).parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    ctx.cleanups.append(lambda: (holder.kill(), holder.wait()))
    assert holder.stdout.readline().strip() == "locked"
    ctx.before = tree(ctx.run)


def dead_lock_record(ctx: Ctx) -> None:
    (ctx.run / ".upcycle-lock").write_text(json.dumps({"pid": 999_999_999, "host": "gone", "command": "train-experts"}))


def stale_temporaries(ctx: Ctx) -> None:
    (ctx.run / "experts" / ".expert-00001.x7k2.tmp").mkdir()
    (ctx.run / "experts" / ".expert-00001.x7k2.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (ctx.run / ".run.json.q1w2.tmp").write_text("{")
    delete("experts/expert-00001")(ctx)


def no_temporaries(ctx: Ctx) -> None:
    left = [p.name for folder in (ctx.run, ctx.run / "experts") if folder.is_dir() for p in folder.iterdir()
            if p.name.endswith(".tmp")]
    assert not left, left


def run_json_without_clusters(ctx: Ctx) -> None:
    ctx.run.mkdir()
    (ctx.run / "run.json").write_text(json.dumps({"format": 1, "data": str(ctx.corpus), "base": str(ctx.base)}))


def corrupt(name: str) -> Callable[[Ctx], None]:
    def write(ctx: Ctx) -> None:
        (ctx.run / name).write_bytes(b"{not json")
    return write


def untouched(ctx: Ctx) -> None:
    assert tree(ctx.run) == ctx.before


def centroids_back(ctx: Ctx) -> None:
    assert (ctx.run / "clusters" / "centroids.npy").is_file()


def nothing_created(ctx: Ctx) -> None:
    assert not ctx.run.exists()


def only_the_lock_left(ctx: Ctx) -> None:
    assert [p.name for p in ctx.run.iterdir()] == [".upcycle-lock"]


def refitted_with_three(ctx: Ctx) -> None:
    assert json.loads((ctx.run / "run.json").read_text())["clusters"]["k"] == 3


def adapter_config_back(ctx: Ctx) -> None:
    assert (ctx.run / "experts" / "expert-00000" / "adapter_config.json").is_file()


def interrupted_cluster(ctx: Ctx) -> None:
    (ctx.run / ".clusters.a1b2.tmp" / "embedder").mkdir(parents=True)  # what kill -9 during `cluster` leaves


def disk_fills_saving_an_expert(ctx: Ctx) -> None:
    delete("experts/expert-00001")(ctx)
    disk_full_in("upcycle.training.lora.write_json", "train.json")(ctx)


def disk_fills_saving_safetensors(ctx: Ctx) -> None:
    """safetensors reports a full disk as its own error type, with the OS error inside the message."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    delete("experts/expert-00001")(ctx)
    ctx.monkeypatch.setattr("peft.peft_model.safe_save_file", full)


def expert_config_kept(ctx: Ctx) -> None:
    assert json.loads((ctx.run / "run.json").read_text())["experts"]["config"]["tokens_per_expert"] == 512


CASES = [
    # cluster: where it writes (item 10, 12)
    Case("cluster-foreign-dir", CLUSTER, needle="not empty and not a run directory", start="none",
         prepare=foreign_directory, loads=False, check=untouched),
    Case("cluster-out-is-a-file", CLUSTER, needle="is a file", start="none", prepare=file_in_the_way, loads=False),
    Case("cluster-empty-dir", CLUSTER, code=0, start="none", prepare=empty_directory),
    Case("cluster-unwritable-parent", CLUSTER, needle="cannot write", start="none", prepare=unwritable_parent,
         loads=False, check=nothing_created),
    Case("cluster-disk-full-fresh", CLUSTER, needle="No space left on device", start="none",
         prepare=disk_full_in("upcycle.introvert.clustering.corpus.fit_and_label"), loads=False,
         check=only_the_lock_left),
    Case("cluster-disk-full-at-run-json", cluster_with("--clustering.clusters", "3"), needle="No space left on device",
         start="clustered", prepare=disk_full_in("upcycle.introvert.run.write_json", "run.json"),
         check=untouched),
    Case("cluster-corrupt-run-json", CLUSTER, needle="is not valid JSON", start="clustered",
         prepare=corrupt("run.json"), loads=None),
    # cluster: bad input (items 14 and the ones that already passed)
    Case("cluster-missing-data", cluster_with(data="{tmp}/nope"), needle="no such file or directory", start="none",
         loads=False, check=nothing_created),
    Case("cluster-empty-data", cluster_with(data="{tmp}/empty"), needle="no usable text", start="none",
         prepare=empty_data_directory, loads=False, check=nothing_created),
    Case("cluster-too-many-clusters", cluster_with("--clustering.clusters", "500"), needle="--clustering.clusters <=",
         start="none", loads=False),
    Case("cluster-zero-clusters", cluster_with("--clustering.clusters", "0"),
         needle="--clustering.clusters must be >= 1", start="none", loads=False),
    Case("cluster-bad-metric", cluster_with("--clustering.metric", "manhattan"), needle="--clustering.metric manhattan",
         start="none", loads=False),
    Case("cluster-bad-embedder", cluster_with("--clustering.embedder", "bert"), needle="unknown embedder", start="none",
         loads=False, check=nothing_created),
    Case("cluster-bad-splits", cluster_with("--splits.test", "1.5"), needle="split fractions", start="none",
         loads=False),
    Case("jsonl-number-text", cluster_with(data="{tmp}/data.jsonl"), needle="line 2: 'text' is a JSON number",
         start="none", prepare=jsonl('{"text": 42}'), loads=False),
    Case("jsonl-boolean-text", cluster_with(data="{tmp}/data.jsonl"), needle="line 2: 'text' is a JSON boolean",
         start="none", prepare=jsonl('{"text": true}'), loads=False),
    Case("jsonl-object-text", cluster_with(data="{tmp}/data.jsonl"), needle="line 2: 'text' is a JSON object",
         start="none", prepare=jsonl('{"text": {"a": "b"}}'), loads=False),
    Case("jsonl-bad-line", cluster_with(data="{tmp}/data.jsonl"), needle="line 2 is not valid JSON", start="none",
         prepare=jsonl('{"text": "cut off'), loads=False),
    Case("jsonl-missing-field", cluster_with("--text_field", "content", data="{tmp}/data.jsonl"),
         needle="no field 'content'", start="none", prepare=jsonl(), loads=False),
    Case("jsonl-text-field", cluster_with("--text_field", "body", data="{tmp}/data.jsonl"), code=0, start="none",
         prepare=jsonl()),
    # cluster: reruns (item 13)
    Case("cluster-rerun-same", CLUSTER, code=0, prepare=snapshot, check=untouched),
    Case("cluster-rerun-other-k-on-trained", cluster_with("--clustering.clusters", "3"), needle="already holds experts",
         prepare=snapshot, check=untouched),
    Case("cluster-rerun-other-k-untrained", cluster_with("--clustering.clusters", "3"), code=0, start="clustered",
         check=refitted_with_three),
    Case("cluster-restores-deleted-centroids", CLUSTER, code=0, prepare=delete("clusters/centroids.npy"),
         check=centroids_back),
    Case("cluster-restores-deleted-documents", CLUSTER, code=0, prepare=delete("clusters/documents.json")),
    Case("cluster-after-interrupted-cluster", CLUSTER, code=0, start="none", prepare=interrupted_cluster,
         check=no_temporaries),
    # train-experts: settings (item 14)
    Case("train-batch-size-0", train_with("--expert.batch_size", "0"), needle="--expert.batch_size must be >= 1"),
    Case("train-block-size-0", train_with("--expert.block_size", "0"), needle="--expert.block_size must be >= 2"),
    Case("train-tokens-per-expert-0", train_with("--expert.tokens_per_expert", "0"),
         needle="--expert.tokens_per_expert must be >= 1"),
    Case("train-lr-0", train_with("--expert.lr", "0"), needle="--expert.lr must be > 0"),
    Case("train-rank-0", train_with("--expert.lora.rank", "0"), needle="LoRA rank must be >= 1"),
    Case("train-bad-executor", train_with("--executor", "slurm"), needle="--executor slurm", start="clustered",
         prepare=snapshot, check=untouched),
    Case("train-workers-0", train_with("--executor", "process", "--workers", "0"), needle="--workers must be >= 1",
         start="clustered", prepare=snapshot, check=untouched),
    Case("train-not-a-run", TRAIN, needle="not a run directory", start="none", prepare=empty_directory, loads=False),
    Case("train-no-clusters", TRAIN, needle="no clusters yet", start="none", prepare=run_json_without_clusters,
         loads=None),
    # train-experts: the run's state (items 11, 12, 13)
    Case("train-locked", TRAIN, needle="is in use by process", prepare=locked_by_another_process, check=untouched),
    Case("train-dead-lock-record", TRAIN, code=0, prepare=dead_lock_record),
    Case("train-read-only", TRAIN, needle="cannot write", prepare=read_only, check=untouched),
    Case("train-stale-temporaries", TRAIN, code=0, prepare=stale_temporaries, check=no_temporaries),
    Case("train-missing-adapter-config", TRAIN, code=0, prepare=delete("experts/expert-00000/adapter_config.json"),
         check=adapter_config_back),
    Case("train-other-settings", train_with("--expert.tokens_per_expert", "2048"),
         needle="was trained with --expert.tokens_per_expert 512", prepare=snapshot, check=untouched),
    Case("train-rerun-same", TRAIN, code=0, prepare=snapshot, check=expert_config_kept),
    Case("train-disk-full-saving-expert", TRAIN, needle="No space left on device",
         prepare=disk_fills_saving_an_expert, check=no_temporaries),
    Case("train-disk-full-in-safetensors", TRAIN, needle="No space left on device; free some disk space",
         prepare=disk_fills_saving_safetensors, check=no_temporaries),
    # evaluate, generate, report, ablate
    Case("evaluate-before-training", ("introvert", "evaluate", "{run}"), needle="experts missing", start="clustered"),
    Case("evaluate-read-only", ("introvert", "evaluate", "{run}"), needle="cannot write", prepare=read_only,
         check=untouched),
    Case("evaluate-locked", ("introvert", "evaluate", "{run}"), needle="is in use by process",
         prepare=locked_by_another_process),
    Case("evaluate-bad-split", ("introvert", "evaluate", "{run}", "--eval.split", "dev"), needle="--eval.split dev"),
    Case("evaluate-bootstrap-0", ("introvert", "evaluate", "{run}", "--eval.bootstrap", "0"),
         needle="--eval.bootstrap"),
    Case("generate-unknown-expert", ("introvert", "generate", "{run}", "import json", "--expert", "expert-00042"),
         needle="expert-00042"),
    Case("generate-bad-expert-id", ("introvert", "generate", "{run}", "import json", "--expert", "nonsense"),
         needle="is not an expert id"),
    Case("generate-zero-tokens", ("introvert", "generate", "{run}", "import json", "--max_new_tokens", "0"),
         needle="max_new_tokens must be >= 1"),
    Case("generate-corrupt-adapter", ("introvert", "generate", "{run}", "import json", "--expert", "expert-00001"),
         needle="expert-00001", prepare=corrupt("experts/expert-00001/adapter_model.safetensors")),
    Case("generate-not-a-run", ("introvert", "generate", "{tmp}", "import json"), needle="not a run directory"),
    Case("report-before-evaluate", ("introvert", "report", "{run}"), needle="results.json does not exist"),
    Case("ablate-zero-clusters", ("introvert", "ablate", "{run}", "--clusters", "[0]"),
         needle="--clusters must be >= 1"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """The corpus, a clustered run and a trained run, built once."""
    root = tmp_path_factory.mktemp("matrix")
    corpus = make_corpus(root / "corpus")
    clustered, trained = root / "clustered", root / "trained"
    assert main(cluster_args(corpus, tiny_llama_dir, clustered)) == 0
    shutil.copytree(clustered, trained)
    assert main(["introvert", "train-experts", str(trained), *TINY_EXPERT]) == 0
    return {"corpus": corpus, "clustered": clustered, "trained": trained}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_case(case: Case, shared, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    ctx = Ctx(run=tmp_path / "run", tmp=tmp_path, corpus=shared["corpus"], base=tiny_llama_dir,
              monkeypatch=monkeypatch)
    if case.start != "none":
        shutil.copytree(shared[case.start], ctx.run)
    try:
        if case.prepare is not None:
            case.prepare(ctx)
        argv = [a.format(run=ctx.run, tmp=ctx.tmp, corpus=ctx.corpus, base=ctx.base) for a in case.argv]
        code, _, err = run_cli(capsys, argv)
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
        restore_writable(ctx.tmp)
    if case.code == 0:
        assert code == 0 and "Traceback" not in err, err
    else:
        assert_one_line_error(code, err, case.needle, case.code)
    monkeypatch.undo()  # checks below read the run with nothing patched
    if case.loads:
        assert_run_loads(ctx.run)
    elif case.loads is False:
        assert not (ctx.run / "run.json").is_file()
    if case.check is not None:
        case.check(ctx)
