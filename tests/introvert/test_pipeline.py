"""The MoIN pipeline end to end on a tiny random Llama and a small multi-topic corpus, plus every bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import TINY_EXPERT, make_corpus
from upcycle.cli import main
from upcycle.data.corpus import stdlib_root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus, tiny_llama_dir) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["introvert", "cluster", "--data", str(corpus), "--base", str(tiny_llama_dir),
                 "--clustering.clusters", "3", "--clustering.embedder", "tfidf", "--out", str(run),
                 "--splits.validation", "0.1", "--splits.test", "0.2"]) == 0
    assert main(["introvert", "train-experts", str(run), *TINY_EXPERT]) == 0
    return run


def test_cluster_step_writes_the_documented_files(trained_run):
    meta = json.loads((trained_run / "run.json").read_text())
    assert meta["clusters"]["k"] == 3 and sum(meta["clusters"]["sizes"]) > 20
    labels = json.loads((trained_run / "clusters" / "documents.json").read_text())
    assert set(labels) == {"train", "validation", "test"} and labels["test"]
    assert (trained_run / "clusters" / "summary.md").is_file()
    assert "torch" in meta["versions"] and meta["commands"]


def test_experts_are_plain_peft_adapters(trained_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    experts = sorted(p.name for p in (trained_run / "experts").iterdir())
    assert experts == ["expert-00000", "expert-00001", "expert-00002"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(base, str(trained_run / "experts" / experts[1]))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init


def test_rerun_skips_finished_experts(trained_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in (trained_run / "experts").rglob("adapter_model.safetensors")}
    assert main(["introvert", "train-experts", str(trained_run), *TINY_EXPERT]) == 0
    assert "0 experts trained, 3 already done" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_python_api_routes_scores_and_generates(trained_run):
    import upcycle

    moe = upcycle.IntrovertExperts.from_run(trained_run)
    texts = [(stdlib_root() / "json" / "decoder.py").read_text()[:800],
             (stdlib_root() / "asyncio" / "locks.py").read_text()[:800]]
    routed = moe.route(texts)
    assert all(r in moe.experts for r in routed)
    routed_ppl = moe.perplexity(texts)
    forced = [moe.perplexity([t], expert=e)[0] for t, e in zip(texts, routed)]
    assert routed_ppl == pytest.approx(forced, rel=1e-6)
    assert moe.perplexity(texts, expert="base") != pytest.approx(routed_ppl)
    generation = moe.generate("import json\n", max_new_tokens=5)
    assert generation.expert in moe.experts and generation.completion_tokens <= 5


def test_evaluate_scores_every_method_and_writes_the_report(trained_run, capsys):
    # evaluation only reads: the baselines are a training step of their own, and evaluate names it
    _fails_with(capsys, ["introvert", "evaluate", str(trained_run), "--eval.bootstrap", "50"],
                f"baselines not trained (lora-all, lora-wide, full); run `upcycle introvert train-baselines "
                f"{trained_run}`")
    assert not (trained_run / "baselines").exists() and not (trained_run / "eval" / "results.json").exists()
    assert main(["introvert", "train-baselines", str(trained_run)]) == 0
    assert main(["introvert", "evaluate", str(trained_run), "--eval.bootstrap", "50"]) == 0
    results = json.loads((trained_run / "eval" / "results.json").read_text())
    assert set(results["methods"]) == {"base", "routed", "routed-top2", "routed-top3", "oracle", "best", "random",
                                       "lora-all", "lora-wide", "full"}  # top-1/2/4 mixtures, k capped at K = 3
    methods = results["methods"]
    # 'best' picks the lowest-loss expert per document, so it can never lose to oracle or random routing
    assert methods["best"]["perplexity"] <= min(methods["oracle"]["perplexity"], methods["random"]["perplexity"])
    tokens = {m["tokens"] for m in methods.values()}
    assert len(tokens) == 1  # every method scored on exactly the same tokens
    assert 0 <= results["routing"]["accuracy"] <= 1
    paired = {(p["method"], p["reference"]): p for p in results["paired"]}
    assert {("routed-top2", "lora-all"), ("routed-top3", "lora-wide"), ("routed-top2", "full")} <= set(paired)
    routed_vs_base = paired[("routed", "base")]
    expected = 100 * (methods["routed"]["perplexity"] / methods["base"]["perplexity"] - 1)
    assert routed_vs_base["delta_pct"] == pytest.approx(expected)
    assert routed_vs_base["ci95_pct"][0] <= routed_vs_base["delta_pct"] <= routed_vs_base["ci95_pct"][1]
    expert_tokens = results["training"]["experts"]["tokens"]
    assert results["training"]["lora-all"]["tokens"] >= expert_tokens  # compute-matched (rounded up to a step)
    report = (trained_run / "report.md").read_text()
    assert "compute-matched" in report and (trained_run / "per_cluster.png").is_file()
    # Baselines are trained from the clean base: no expert adapter leaks into their weights.
    from safetensors import safe_open

    with safe_open(trained_run / "baselines" / "full" / "model.safetensors", "pt") as handle:
        assert not [key for key in handle.keys() if "lora_" in key or "base_layer" in key]
    for name in ("lora-all", "lora-wide"):
        with safe_open(trained_run / "baselines" / name / "adapter_model.safetensors", "pt") as handle:
            assert handle.keys() and not [key for key in handle.keys() if "expert-" in key]


def test_a_reference_run_is_scored_on_this_runs_documents_and_must_share_base_and_splits(trained_run, tmp_path,
                                                                                           capsys):
    # The same experts under another name: scored through the reference path they must equal 'routed' exactly.
    twin = tmp_path / "twin"
    shutil.copytree(trained_run, twin, ignore=shutil.ignore_patterns("eval", "baselines", "report.md", "*.png"))
    results_path = trained_run / "eval" / "results.json"
    kept = results_path.read_bytes() if results_path.is_file() else None
    try:
        assert main(["introvert", "evaluate", str(trained_run), "--eval.baselines", "false", "--eval.bootstrap", "20",
                     "--eval.guard_percentile", "null", "--eval.reference_run", str(twin)]) == 0
        results = json.loads(results_path.read_text())
    finally:  # other tests read the full evaluation
        if kept is not None:
            results_path.write_bytes(kept)
    methods = results["methods"]
    assert methods["reference"]["perplexity"] == pytest.approx(methods["routed"]["perplexity"], rel=1e-9)
    paired = {(p["method"], p["reference"]): p for p in results["paired"]}
    assert paired[("routed", "reference")]["delta_pct"] == pytest.approx(0.0, abs=1e-7)
    meta = json.loads((twin / "run.json").read_text())
    for key, value, needle in (("splits", {**meta["splits"], "test": 0.5}, "splits its documents differently"),
                               ("base", "gguf:elsewhere.gguf", "compare runs of the same base")):
        (twin / "run.json").write_text(json.dumps({**meta, key: value}))
        _fails_with(capsys, ["introvert", "evaluate", str(trained_run), "--eval.baselines", "false",
                             "--eval.guard_percentile", "null", "--eval.reference_run", str(twin)], needle)


def test_train_baselines_skips_finished_baselines(trained_run, capsys):
    assert main(["introvert", "train-baselines", str(trained_run)]) == 0  # trains them, or finds them done
    weights = [p for p in (trained_run / "baselines").rglob("*.safetensors")]
    before = {p: p.stat().st_mtime_ns for p in weights}
    commands = lambda: json.loads((trained_run / "run.json").read_text())["commands"]  # noqa: E731
    recorded = len(commands())
    capsys.readouterr()
    assert main(["introvert", "train-baselines", str(trained_run)]) == 0
    assert "0 baselines trained (none), 3 already done" in capsys.readouterr().out
    assert len(weights) == 3 and before == {p: p.stat().st_mtime_ns for p in weights}
    assert len(commands()) == recorded + 1  # the report's "Reproduce" lists it


def test_demo_trains_the_baselines_before_it_evaluates(monkeypatch, tmp_path):
    from upcycle.introvert import commands
    from upcycle.introvert.config import EvalConfig

    calls = []
    for step in ("cluster", "train_experts", "train_baselines", "evaluate"):
        monkeypatch.setattr(commands, step, lambda *args, step=step, **kwargs: calls.append(step))
    commands.demo(out=str(tmp_path / "run"))
    assert calls == ["cluster", "train_experts", "train_baselines", "evaluate"]
    calls.clear()
    commands.demo(out=str(tmp_path / "run"), eval=EvalConfig(baselines=False))
    assert calls == ["cluster", "train_experts", "evaluate"]


def test_lm_eval_harness_scores_the_routed_model(trained_run, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from upcycle.introvert.lm_eval import IntrovertLM

    rows = [{"context": "import json\n", "choices": ["json.dumps(x)", "zzz qqq ((("], "label": 0},
            {"context": "async def main():\n    await", "choices": [" asyncio.sleep(1)", " ]]]} ("], "label": 0}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tiny_task.yaml").write_text(f"""task: upcycle_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files: {{test: {tmp_path / 'data.jsonl'}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    lm = IntrovertLM(run=str(trained_run))
    out = simple_evaluate(model=lm, tasks=["upcycle_tiny_choice"], task_manager=TaskManager(include_path=str(tmp_path)))
    acc = out["results"]["upcycle_tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    # the harness's scores equal our own log-likelihood computation
    request_score, _ = lm._continuation_logprob(rows[0]["context"], rows[0]["choices"][0])
    assert request_score < 0


# -- bad input: one line on stderr, exit code != 0, no traceback -------------------------------------------------------
def _fails_with(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_missing_path_empty_corpus_and_too_many_clusters(tmp_path, capsys, tiny_llama_dir, corpus):
    base = ["--base", str(tiny_llama_dir), "--clustering.embedder", "tfidf"]
    _fails_with(capsys, ["introvert", "cluster", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                         *base], "no such file or directory")
    (tmp_path / "empty").mkdir()
    _fails_with(capsys, ["introvert", "cluster", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"),
                         *base], "no usable text")
    _fails_with(capsys, ["introvert", "cluster", "--data", str(corpus), "--base", str(tiny_llama_dir),
                         "--clustering.clusters", "500", "--clustering.embedder", "tfidf",
                         "--out", str(tmp_path / "r")], "--clustering.clusters <=")


def test_unwritable_output_directory(tmp_path, capsys, corpus, tiny_llama_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions; use a path under a regular file instead
        target = tmp_path / "afile"
        target.write_text("x")
        out = target / "run"
    else:
        out = locked / "run"
    _fails_with(capsys, ["introvert", "cluster", "--data", str(corpus), "--base", str(tiny_llama_dir),
                         "--clustering.embedder", "tfidf", "--clustering.clusters", "2", "--out", str(out)],
                "cannot write")


def test_not_a_run_directory(tmp_path, capsys):
    _fails_with(capsys, ["introvert", "train-experts", str(tmp_path)], "not a run directory")


def test_corrupt_and_foreign_adapters_are_refused(trained_run, tmp_path, capsys, tiny_tokenizer):
    from tests.conftest import save_tiny_llama

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    (run / "experts" / "expert-00001" / "adapter_model.safetensors").write_bytes(b"garbage")
    _fails_with(capsys, ["introvert", "generate", str(run), "import json", "--expert", "expert-00001"], "expert-00001")
    # an adapter trained on another base (same architecture, other weights)
    other = save_tiny_llama(tmp_path / "other-base", tiny_tokenizer, seed=7)
    meta = json.loads((run / "run.json").read_text())
    meta["base"] = str(other)
    (run / "run.json").write_text(json.dumps(meta))
    _fails_with(capsys, ["introvert", "generate", str(run), "import json", "--expert", "expert-00002"],
                "another base model")


def test_ctrl_c_leaves_no_half_written_expert_and_rerun_finishes(tmp_path, corpus, tiny_llama_dir):
    run = tmp_path / "run"
    assert main(["introvert", "cluster", "--data", str(corpus), "--base", str(tiny_llama_dir),
                 "--clustering.clusters", "3", "--clustering.embedder", "tfidf", "--out", str(run)]) == 0
    # long enough per expert (thousands of steps) that the interrupt surely lands inside the second one
    slow = ["--expert.tokens_per_expert", "300000", "--expert.batch_size", "2", "--expert.block_size", "64"]
    env = dict(os.environ, UPCYCLE_NO_PROGRESS="1", UPCYCLE_LOG="INFO")
    # A shell without job control starts background jobs with SIGINT ignored, and children inherit that (e.g.
    # `make test &`): give the child the default disposition so that Python turns SIGINT into KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "upcycle.cli", "introvert", "train-experts", str(run), *slow],
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:  # wait until the second expert is training: the first one is complete on disk
        seen.append(line)
        if "training expert-00001" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "rerun" in err and "Traceback" not in err, "".join(seen) + err
    experts = run / "experts"
    assert sorted(p.name for p in experts.iterdir()) == ["expert-00000"]  # complete ones only, no temp dirs
    assert (experts / "expert-00000" / "adapter_model.safetensors").is_file()
    # Other settings than expert-00000 was trained with: refused, and run.json still says how it was trained.
    before = (run / "run.json").read_text()
    assert main(["introvert", "train-experts", str(run), *TINY_EXPERT]) == 2
    assert (run / "run.json").read_text() == before
    shutil.rmtree(experts)  # what the error suggests to train every expert with the new settings
    assert main(["introvert", "train-experts", str(run), *TINY_EXPERT]) == 0
    assert len(list((run / "experts").glob("expert-*"))) == 3


def test_ablation_over_k_reuses_embeddings_and_reports_intervals(trained_run):
    if not (trained_run / "eval" / "results.json").is_file():  # run alone: the report needs the evaluation
        assert main(["introvert", "evaluate", str(trained_run), "--eval.bootstrap", "20"]) == 0
    code = main(["introvert", "ablate", str(trained_run), "--clusters", "[1,2]", "--seeds", "[0,1]",
                 "--total_tokens", "512", "--expert.batch_size", "2", "--expert.block_size", "64",
                 "--eval.bootstrap", "20"])
    assert code == 0
    ablation = json.loads((trained_run / "eval" / "ablation.json").read_text())
    assert set(ablation["by_k"]) == {"1", "2"}
    for entry in ablation["by_k"].values():
        assert entry["seeds"] == 2 and len(entry["routed"]["values"]) == 2 and entry["routed"]["ci95_halfwidth"] >= 0
    # with one cluster every router sends everything to the only expert
    assert ablation["by_k"]["1"]["routing_accuracy"]["mean"] == 1.0
    assert ablation["by_k"]["1"]["routed"]["values"] == ablation["by_k"]["1"]["oracle"]["values"]
    assert (trained_run / "ablation_k.png").is_file()


def test_ray_executor_trains_the_same_experts(tmp_path, corpus, tiny_llama_dir):
    pytest.importorskip("ray")
    import ray

    run = tmp_path / "run"
    assert main(["introvert", "cluster", "--data", str(corpus), "--base", str(tiny_llama_dir),
                 "--clustering.clusters", "2", "--clustering.embedder", "tfidf", "--out", str(run)]) == 0
    try:
        assert main(["introvert", "train-experts", str(run), "--executor", "ray", *TINY_EXPERT]) == 0
    finally:
        ray.shutdown()
    assert sorted(p.name for p in (run / "experts").iterdir()) == ["expert-00000", "expert-00001"]
    meta = json.loads((run / "experts" / "expert-00001" / "train.json").read_text())
    assert meta["cluster"] == 1 and meta["tokens"] >= 512


def test_hub_style_spec_loads_a_local_dataset_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from upcycle.data import load_documents

    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"content": ["def a(): pass", "def b(): pass"]}), tmp_path / "ds" / "train.parquet")
    docs = load_documents(f"hf:{tmp_path / 'ds'}", text_field="content")
    assert [d.text for d in docs] == ["def a(): pass", "def b(): pass"]
