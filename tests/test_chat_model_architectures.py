"""The chat-model pipeline on any local chat model: tiny random Llama, Qwen2 and Gemma3 models built from configs and
saved with a chat template (Gemma's ends a turn with ``<end_of_turn>``, not its EOS token), run end to end; the
command line's ``--model`` and the presets' recipes."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from revlens import encode_requests
from revlens.demos.chat_model.data import REFUSAL, PromptSets, end_of_turn_id, sft_tensors
from revlens.demos.chat_model.pipeline import Settings, run_chat_model
from revlens.demos.chat_model.recipe import PRESETS, Recipe

from hf_models import ARCHITECTURES, TINY_RUN, save_tiny_chat_model

SETTINGS = Settings(seeds=1, modes=("plain", "grad@best"), **TINY_RUN)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def run(request, tmp_path_factory):
    arch = request.param
    folder = save_tiny_chat_model(tmp_path_factory.mktemp(arch) / "model", arch)
    out = tmp_path_factory.mktemp(f"{arch}-run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the tiny model does not calibrate
        report = run_chat_model(out, model=folder, settings=SETTINGS, progress=False, workers=1, html=False)
    return arch, folder, out, report


def test_the_pipeline_runs_and_its_alignment_matches_hf_hidden_states(run):
    """The report's alignment at the last step == cos(drift, v_rev) of the contrast readout read from the HF
    model's own hidden states (before the final norm), for every architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, folder, out, report = run
    hist = out / "history"
    assert (hist / "pretrain").resolve() == folder.resolve()
    assert report.runs == ["seed_0"] and report.steps == [1, 2]
    assert report.config["demo"]["pipeline"] == "chat_model" and report.config["demo"]["preset"] is None
    assert set(report.interventions["metrics"]) == {"plain", "grad@best"}
    sets = PromptSets.load().subset(3)
    tok = AutoTokenizer.from_pretrained(hist / "align")

    def contrast(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        means = []
        for requests in (sets.harmful_of("probe"), sets.harmless_of("probe")):
            rows = []
            with torch.no_grad():
                for ids in encode_requests(tok, requests, chat_template=True):
                    hs = model(ids[None], output_hidden_states=True).hidden_states
                    rows.append(torch.stack([h[0, -1] for h in hs[1:]]).double())
            means.append(torch.stack(rows).mean(0))
        return means[0] - means[1]

    ali = contrast(hist / "align")
    v = torch.nn.functional.normalize(contrast(hist / "pretrain") - ali, dim=-1)
    d = contrast(hist / "finetune" / "seed_0" / "step_2") - ali
    expected = (torch.nn.functional.normalize(d, dim=-1) * v).sum(-1)
    torch.testing.assert_close(torch.tensor(report.alignment[0, 1, :-1]), expected[:-1], rtol=0, atol=1e-4)


def test_training_rows_end_with_the_templates_end_of_turn(run):
    """The answer's last trained token is the one the chat template writes after an assistant message."""
    arch, folder, out, _ = run
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": REFUSAL}], tokenize=False
    )
    after = text[text.index(REFUSAL) + len(REFUSAL) :]
    expected = tok(after, add_special_tokens=False)["input_ids"][0]
    assert end_of_turn_id(tok) == expected
    assert (expected == tok.eos_token_id) == (arch != "gemma3")
    tokens, mask = sft_tensors(tok, [("how do i bake a cake", REFUSAL)])
    answer = tokens[0][mask[0].bool()].tolist()
    assert answer == tok(REFUSAL, add_special_tokens=False)["input_ids"] + [expected]


def test_the_manifest_records_the_model_and_resumes(run):
    arch, folder, out, report = run
    manifest = json.loads((out / "chat_model.json").read_text())
    assert manifest["key"]["model"] == str(folder.resolve())
    again = run_chat_model(out, model=folder, settings=SETTINGS, progress=False, workers=1, html=False)
    assert again.alignment.tolist() == report.alignment.tolist()


def test_settings_are_a_recipe_plus_the_runs_shape():
    """Every recipe field is a setting with the same default; a preset's recipe reaches the settings; the first
    calibration method keeps the settings key the SmolLM2 demo wrote (kept align folders stay valid)."""
    settings = {f.name: f.default for f in fields(Settings)}
    assert {name: settings[name] for name in Recipe.names()} == asdict(Recipe())
    qwen = PRESETS["qwen2.5-coder-0.5b"].recipe
    assert Settings.of(qwen).recipe == qwen and Settings.of(qwen, quick=True).seeds == 1
    assert Settings.of(PRESETS["smollm2"].recipe) == Settings()
    assert "calibration" not in Settings(calibration="generate").key()
    with pytest.raises(ValueError, match="calibration 'exact'"):
        Recipe(calibration="exact")


def test_cli_model_runs_the_chat_pipeline_with_the_default_recipe(monkeypatch, tmp_path, capsys):
    import revlens.demos.chat_model.pipeline as pipeline
    from revlens.cli import main

    seen = {}

    def fake_run(out, **kwargs):
        seen.update(kwargs, out=out)
        return "report"

    monkeypatch.setattr(pipeline, "run_chat_model", fake_run)
    monkeypatch.setattr(pipeline, "print_chat_model", lambda report: None)
    assert main(["demo", "--model", str(tmp_path / "my-model.gguf"), "--quick"]) == 0
    assert seen["model"] == str(tmp_path / "my-model.gguf") and seen["preset"] is None
    assert seen["settings"] == Settings.of(Recipe(), quick=True)
    assert seen["out"] == "revlens_out/chat-my-model-quick"
    assert main(["demo", "--preset", "qwen2.5-coder-0.5b", "--out", str(tmp_path / "q")]) == 0
    assert seen["preset"] == "qwen2.5-coder-0.5b" and seen["model"] is None
    assert seen["settings"] == Settings.of(PRESETS["qwen2.5-coder-0.5b"].recipe)
    with pytest.raises(SystemExit, match="--quick run on a real chat model"):
        main(["demo", "--preset", "tiny", "--quick"])
