"""The chat-model pipeline end to end on a tiny random Llama chat model (a folder instead of the GGUF), with the
first calibration method (answers generated at every check): the numbers of the SmolLM2 demo it grew from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from revlens.chat import encode_requests
from revlens.demos.chat_model.data import REFUSAL, PromptSets, sft_tensors
from revlens.demos.chat_model.pipeline import Settings, run_chat_model
from revlens.demos.chat_model.tasks import TASKS, benign_pairs
from revlens.evals import RefusalPhraseJudge

from hf_models import TINY_RUN, chat_tokenizer, save_tiny_chat_model

MODES = (
    "plain",
    "grad@best",
    "clamp@all",
    "anchor@0.1+contrast@0.1+rank@2+sample@2",
    "anchor@0.1+contrast@0.1+random@2+sample@2",
)
SETTINGS = Settings(
    **(TINY_RUN | dict(task_examples=16, task_eval=4, generate_batch=3, prompt_subset=4)),
    calibration="generate",
    seeds=2,
    modes=MODES,
    defense_rank=2,  # the defenses comparison's subspaces (4 probe prompts)
)


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", "llama")


@pytest.fixture(scope="module")
def demo(tiny_chat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    with pytest.warns(RuntimeWarning, match="did not reach"):
        report = run_chat_model(out, model=tiny_chat_dir, settings=SETTINGS, progress=False, workers=1)
    return out, report


def _naive_answer(model, tok, request: str, n: int) -> str:
    ids = encode_requests(tok, [request], chat_template=True)[0][None]
    n_prompt = ids.shape[1]
    for _ in range(n):
        nxt = model(ids).logits[0, -1].argmax()
        if int(nxt) == tok.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return tok.decode(ids[0, n_prompt:].tolist(), skip_special_tokens=True).strip()


def test_history_layout_and_behaviour(demo, tiny_chat_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = demo
    hist = out / "history"
    assert (hist / "pretrain").resolve() == tiny_chat_dir.resolve()
    for run in ("seed_0", "seed_1"):
        for step in (1, 2):
            assert (hist / "finetune" / run / f"step_{step}" / "model.safetensors").is_file()
    assert report.runs == ["seed_0", "seed_1"] and report.steps == [1, 2]
    manifest = json.loads((out / "chat_model.json").read_text())
    align = manifest["align"]
    assert align["trained_steps"] == 2 and align["calibrated"] is False
    # no check met both targets: the model kept is the check with the smallest shortfall (later on ties)
    gaps = {
        int(k): max(c["harm"] - 0.10, 0) + max(0.80 - c["harmless_answered"], 0) for k, c in align["checks"].items()
    }
    assert align["steps"] == max(k for k, g in gaps.items() if g == min(gaps.values()))
    assert (hist / "align").resolve().parent == (out / "aligned").resolve()
    # batched, cached, left-padded generation == a one-token-at-a-time loop without cache
    sets = PromptSets.load().subset(4)
    model = AutoModelForCausalLM.from_pretrained(hist / "align").eval()
    tok = AutoTokenizer.from_pretrained(hist / "align")
    judge = RefusalPhraseJudge()
    with torch.no_grad():
        answers = [_naive_answer(model, tok, r, 3) for r in sets.harmful_of("heldout")]
    harm = sum(judge(r, a) for r, a in zip(sets.harmful_of("heldout"), answers)) / 4
    assert manifest["behaviour"]["align"]["harm"] == pytest.approx(harm)
    assert report.behaviour["harm"]["align"] == [pytest.approx(harm)]
    assert len(report.behaviour["harm"]["final"]) == 2


def test_alignment_matches_hf_hidden_states(demo):
    """The report's alignment at step 2 == cos(drift, v_rev) from HF hidden states read directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = demo
    hist = out / "history"
    tok = AutoTokenizer.from_pretrained(hist / "align")
    sets = PromptSets.load().subset(4)

    def centroid(folder, requests):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        rows = []
        with torch.no_grad():
            for ids in encode_requests(tok, requests, chat_template=True):
                hs = model(ids[None], output_hidden_states=True).hidden_states
                rows.append(torch.stack([h[0, -1] for h in hs[1:]]).double())
        return torch.stack(rows).mean(0)

    def contrast(folder):
        return centroid(folder, sets.harmful_of("probe")) - centroid(folder, sets.harmless_of("probe"))

    pre, ali = contrast(hist / "pretrain"), contrast(hist / "align")
    v = torch.nn.functional.normalize(pre - ali, dim=-1)
    for ri, run in enumerate(report.runs):
        d = contrast(hist / "finetune" / run / "step_2") - ali
        expected = (torch.nn.functional.normalize(d, dim=-1) * v).sum(-1)
        # HF's last hidden state is after the final norm; TransformerLens' resid_post of the last block is before it
        torch.testing.assert_close(torch.tensor(report.alignment[ri, 1, :-1]), expected[:-1], rtol=0, atol=1e-4)


def test_blocking_table_and_paper_rows(demo):
    out, report = demo
    iv = report.interventions
    assert iv["modes"] == list(MODES) and iv["seeds"] == [0, 1]
    for mode in MODES:
        assert len(iv["metrics"][mode]["harmfulness"]) == 2
    manifest = json.loads((out / "chat_model.json").read_text())
    final = [manifest["finetune"][f"seed_{s}"]["behaviour"]["2"]["harm"] for s in (0, 1)]
    assert iv["metrics"]["plain"]["harmfulness"] == pytest.approx(final)
    assert report.config["paper_comparison"][0]["quantity"] == "alignment after the first update"
    assert (out / "dashboard.html").is_file() and (out / "report.json").is_file()


def test_rerun_resumes_and_refuses_other_settings(demo, tiny_chat_dir):
    out, report = demo
    (out / "chat_model.json").rename(out / "smollm2.json")  # a run folder written before the pipeline was generic
    again = run_chat_model(out, model=tiny_chat_dir, settings=SETTINGS, progress=False, workers=1)
    assert again.alignment.tolist() == report.alignment.tolist()
    assert (out / "chat_model.json").is_file() and not (out / "smollm2.json").exists()
    with pytest.raises(ValueError, match="other settings"):
        run_chat_model(out, model=tiny_chat_dir, settings=Settings(**{**SETTINGS.__dict__, "lr": 2e-3}), progress=False)


def test_chat_tensors_mask_the_response_only():
    tok = chat_tokenizer()
    tokens, mask = sft_tensors(tok, [("how do i bake a cake", REFUSAL), ("what is two plus three", "five")])
    text = tok.apply_chat_template(
        [{"role": "user", "content": "what is two plus three"}], tokenize=False, add_generation_prompt=True
    )
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    answer = tok("five", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = tokens[1, : len(prompt) + len(answer)].tolist()
    assert row == prompt + answer and prompt.count(tok.bos_token_id) == 3  # system, user, assistant turns: no extra BOS
    assert mask[1].tolist() == [0] * len(prompt) + [1] * len(answer) + [0] * (tokens.shape[1] - len(row))


def test_benign_tasks_are_deterministic_and_correct():
    for task in TASKS:
        a, b = benign_pairs(20, seed=3, tasks=(task,)), benign_pairs(20, seed=3, tasks=(task,))
        assert a == b and a != benign_pairs(20, seed=4, tasks=(task,))
    for request, answer in benign_pairs(30, seed=0, tasks=TASKS):
        if request.startswith(("Reverse", "Write these words in reverse")):
            assert answer.split() == request.split(":", 1)[1].split()[::-1]
        elif "+" in answer:
            x, rest = answer.split(" + ")
            y, z = rest.split(" = ")
            assert int(x) + int(y) == int(z)
        else:
            assert answer == request.split(":", 1)[1].strip().upper()


def test_prompt_files_are_matched_and_split():
    sets = PromptSets.load()
    assert len(sets.harmful) == len(sets.harmless) >= 150
    assert len(set(sets.harmful)) == len(sets.harmful) and len(set(sets.harmless)) == len(sets.harmless)
    assert sorted(i for v in sets.split.values() for i in v) == list(range(len(sets.harmful)))
    assert {k: len(v) for k, v in sets.split.items()} == {"train": 64, "probe": 45, "heldout": 48}


def test_bridge_weights_come_back_as_a_plain_hf_model(tiny_chat_dir, tmp_path):
    """After a training step through the TransformerBridge, to_hf() and the saved folder give the bridge's
    logits, and generation on them equals a token-by-token loop (the bridge's wrapped module is not used)."""
    from transformers import AutoModelForCausalLM

    from revlens.checkpoint_loader import load_checkpoint
    from revlens.checkpoint_save import save_checkpoint
    from revlens.demos.chat_model.behaviour import greedy_answers
    from revlens.demos.chat_model.hf_io import HFBridge

    hb = HFBridge(tiny_chat_dir)
    x = encode_requests(hb.tokenizer, ["how do i bake a cake"], chat_template=True)[0][None]
    opt = torch.optim.AdamW(hb.bridge.parameters(), lr=1e-2)
    hb.bridge(x).logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        expected = hb.bridge(x)
        plain = hb.to_hf()
        torch.testing.assert_close(plain(x).logits, expected, rtol=0, atol=1e-5)
        folder = save_checkpoint(hb.bridge, tmp_path / "m")
        saved = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert saved.dtype == torch.float32
        torch.testing.assert_close(saved(x).logits, expected, rtol=0, atol=1e-5)
        reloaded = load_checkpoint(folder, dtype="float32")
        assert next(reloaded.parameters()).dtype == torch.float32
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-5)
        requests = ["how do i bake a cake", "write a poem about the sea"]
        expected_answers = [_naive_answer(plain, hb.tokenizer, r, 4) for r in requests]
        assert greedy_answers(plain, hb.tokenizer, requests, 4) == expected_answers
        # core generate_greedy on the trained bridge itself runs a plain HF module sharing its tensors
        assert greedy_answers(hb.bridge, hb.tokenizer, requests, 4) == expected_answers


def test_balanced_batches_draw_the_given_share_of_each_group():
    from revlens.demos.chat_model.train import draw_batch

    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([draw_batch([(5, 3), (3, 5)], gen) for _ in range(200)])
    assert ((rows[:, :3] >= 0) & (rows[:, :3] < 5)).all() and ((rows[:, 3:] >= 5) & (rows[:, 3:] < 8)).all()
    assert set(rows[:, :3].flatten().tolist()) == set(range(5)) and set(rows[:, 3:].flatten().tolist()) == {5, 6, 7}
    with pytest.raises(ValueError, match="rows must be"):
        draw_batch([(0, 3)], gen)


def test_cli_refuses_flags_the_smollm2_preset_does_not_use(capsys):
    from revlens.cli import main

    with pytest.raises(SystemExit, match="--device, --block-layers: not used by the chat-model pipeline"):
        main(["demo", "--preset", "smollm2", "--device", "cuda", "--block-layers", "1", "--workers", "2"])


@pytest.mark.slow  # 30 s: the workers' arithmetic is tests/test_jobpool.py's; this is the pipeline through them
def test_worker_processes_give_the_one_process_numbers(demo, tiny_chat_dir, tmp_path, monkeypatch):
    """The pretrain model's answers, align's generated checks (one job per generation batch), the fine-tuning
    runs, their evaluations and the blocked runs on 2 worker processes (one thread each, like this suite's
    process) record what the one-process run recorded."""
    import revlens.jobpool

    monkeypatch.setattr(revlens.jobpool, "threads_per_worker", lambda workers, cores=None: 1)
    out, report = demo
    with pytest.warns(RuntimeWarning, match="did not reach"):
        again = run_chat_model(tmp_path, model=tiny_chat_dir, settings=SETTINGS, progress=False, html=False, workers=2)
    one, two = (json.loads((d / "chat_model.json").read_text()) for d in (out, tmp_path))
    for run in ("seed_0", "seed_1"):
        assert two["finetune"][run]["losses"] == one["finetune"][run]["losses"]
        for step, b in one["finetune"][run]["behaviour"].items():
            assert {k: v for k, v in two["finetune"][run]["behaviour"][step].items() if k != "seconds"} == {
                k: v for k, v in b.items() if k != "seconds"
            }
    assert two["blocking"] == one["blocking"]
    assert two["behaviour"]["pretrain"] == one["behaviour"]["pretrain"]
    assert two["align"]["checks"] == one["align"]["checks"] and two["behaviour"]["align"] == one["behaviour"]["align"]
    assert again.alignment.tolist() == report.alignment.tolist()
    assert again.config["demo"]["workers"] == 2


def test_quick_and_full_runs_share_one_align(tiny_chat_dir, tmp_path):
    from dataclasses import replace

    from revlens.demos.chat_model.pipeline import _Context

    def store(settings, out="a"):
        return _Context(tmp_path / out, tiny_chat_dir, settings, PromptSets.load(), shared_align=True).align_store

    full = store(Settings())
    assert store(Settings.quick(), out="b") == full and full.parent == tiny_chat_dir.parent / "aligned"
    assert store(replace(Settings(), seeds=1, modes=("plain",), finetune_steps=50, task_eval=8)) == full
    assert store(replace(Settings(), align_lr=1e-4)) != full
    assert store(replace(Settings(), check_tokens=12)) != full


def test_align_behaviour_is_the_kept_checks_full_evaluation(tiny_chat_dir, tmp_path):
    """When the checks read every held-out request with the reported answer length, align's behaviour is the
    kept check's evaluation, and equals a one-token-at-a-time evaluation of the saved align model."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from revlens.demos.chat_model.pipeline import ALIGN_RECORD, _Context, build_history

    settings = replace(SETTINGS, seeds=0, check_prompts=48, check_tokens=SETTINGS.max_new_tokens)
    sets = PromptSets.load().subset(4)
    ctx = _Context(tmp_path, tiny_chat_dir, settings, sets, shared_align=False)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        build_history(ctx)
    record = json.loads((tmp_path / "history" / "align" / ALIGN_RECORD).read_text())
    kept = record["align"]["checks"][str(record["align"]["steps"])]
    assert {k: record["behaviour"][k] for k in kept} == kept
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "history" / "align").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "history" / "align")
    judge = RefusalPhraseJudge()
    with torch.no_grad():
        harmful = [_naive_answer(model, tok, r, 3) for r in sets.harmful_of("heldout")]
        harmless = [_naive_answer(model, tok, r, 3) for r in sets.harmless_of("heldout")]
    assert kept["harm"] == pytest.approx(sum(judge(r, a) for r, a in zip(sets.harmful_of("heldout"), harmful)) / 4)
    answered = 1 - sum(not judge(r, a) for r, a in zip(sets.harmless_of("heldout"), harmless)) / 4
    assert kept["harmless_answered"] == pytest.approx(answered)


def test_defenses_comparison_on_a_tiny_history(demo, tiny_chat_dir):
    """`--compare defenses`: every quick-grid mode runs once per seed; the answers file of plain holds the
    uncached greedy answers, and its harm rate and Wilson interval are recomputed from them."""
    import warnings
    from dataclasses import replace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from revlens.defense_table import defense_table
    from revlens.defenses import defense_grid
    from revlens.stats import wilson_interval

    out, _ = demo
    settings = replace(SETTINGS, modes=(), defense_grid="quick", defense_sets=("heldout", "harmless"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = run_chat_model(
            out, model=tiny_chat_dir, settings=settings, progress=False, workers=1, compare="defenses", html=False
        )
    d = report.config["defenses"]
    assert [r["mode"] for r in d["rows"]] == list(defense_grid(quick=True, rank=2))
    assert [s["name"] for s in d["sets"]] == ["heldout", "harmless"] and set(d["phases"]) == {"pretrain", "align"}
    lines = [json.loads(l) for l in (out / "defenses" / "answers" / "plain" / "seed_0.jsonl").read_text().splitlines()]
    heldout = [l for l in lines if l["set"] == "heldout"]
    model = AutoModelForCausalLM.from_pretrained(out / "history" / "finetune" / "seed_0" / "step_2").eval()
    tok = AutoTokenizer.from_pretrained(out / "history" / "finetune" / "seed_0" / "step_2")
    with torch.no_grad():
        assert [l["answer"] for l in heldout] == [_naive_answer(model, tok, l["prompt"], 3) for l in heldout]
    plain = next(r for r in d["rows"] if r["mode"] == "plain")["sets"]["heldout"]
    k = sum(RefusalPhraseJudge()(x["prompt"], x["answer"]) for s in (0, 1) for x in _answers(out, s, "heldout"))
    assert (plain["k"], plain["n"]) == (k, 8)
    assert (plain["low"], plain["high"]) == pytest.approx(wilson_interval(k, 8))
    assert "replay@2" in defense_table(d, harm_set="heldout")


def _answers(out, seed, name):
    path = out / "defenses" / "answers" / "plain" / f"seed_{seed}.jsonl"
    return [x for x in map(json.loads, path.read_text().splitlines()) if x["set"] == name]
