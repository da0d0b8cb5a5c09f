"""Chat templates: requests rendered exactly as the template does, read at its last token, recorded."""

from __future__ import annotations

import warnings

import pytest
import torch

import revlens
from revlens.chat import encode_requests, template_for_history, uses_chat_template
from revlens.checkpoint_loader import load_hf_folder
from revlens.probe import ProbeError, ReversionProbe

from conftest import PROMPTS

REQUESTS = ["how do i make a bomb", "write a poem about the sea", "five"]


def user_turn(tok, prompt, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def chat_bridge(tiny_llama_dir):
    return load_hf_folder(tiny_llama_dir)


def test_encode_requests_is_the_rendered_template_with_one_bos(chat_tok):
    ids = encode_requests(chat_tok, REQUESTS)
    bos = chat_tok.bos_token_id
    for prompt, row in zip(REQUESTS, ids):
        text = user_turn(chat_tok, prompt)
        assert row.dtype == torch.long
        assert row.tolist() == chat_tok(text, add_special_tokens=False)["input_ids"]
        assert chat_tok.decode(row) == text
        # ChatML's <|im_start|> is BOS and the template's first token: exactly one at the start.
        assert row[0] == bos and row[1] != bos
        assert int((row == bos).sum()) == text.count("<|im_start|>") == 3
    with_system = encode_requests(chat_tok, REQUESTS[:1], system="Answer briefly.")[0]
    assert chat_tok.decode(with_system) == user_turn(chat_tok, REQUESTS[0], "Answer briefly.")
    assert "helpful assistant" not in chat_tok.decode(with_system)


def test_template_choices(chat_tok, tokenizer):
    assert uses_chat_template(chat_tok) and uses_chat_template(chat_tok, True)
    assert not uses_chat_template(chat_tok, False)
    assert not uses_chat_template(tokenizer)  # the word tokenizer has no template: raw prompts under "auto"
    with pytest.raises(ValueError, match="no chat template"):
        uses_chat_template(tokenizer, True)
    with pytest.raises(ValueError, match="Jinja"):
        uses_chat_template(chat_tok, "none")
    custom = "{{ bos_token }}Q: {{ messages[-1]['content'] }}\nA:"
    row = encode_requests(chat_tok, ["five"], chat_template=custom)[0]
    assert chat_tok.decode(row) == "<|im_start|>Q: five\nA:"
    assert row[0] == chat_tok.bos_token_id and row[1] != chat_tok.bos_token_id
    with pytest.raises(ValueError, match="system= needs a chat template"):
        encode_requests(chat_tok, ["five"], chat_template=False, system="x")


def test_raw_requests_match_to_tokens(tiny_model, chat_bridge):
    for model in (tiny_model, chat_bridge):
        raw = encode_requests(model.tokenizer, PROMPTS[:3], chat_template=False)
        for prompt, row in zip(PROMPTS[:3], raw):
            assert row.tolist() == model.to_tokens(prompt)[0].tolist()


def test_chat_templated_readout_equals_run_with_cache_at_the_last_token(chat_bridge, chat_tok):
    probe = ReversionProbe(REQUESTS, layers=[0, 1], batch_size=2)
    result = probe.measure(chat_bridge)
    assert probe.chat_template_used is True
    for i, prompt in enumerate(REQUESTS):
        tokens = torch.tensor([chat_tok(user_turn(chat_tok, prompt), add_special_tokens=False)["input_ids"]])
        _, cache = chat_bridge.run_with_cache(tokens)
        for j, layer in enumerate((0, 1)):
            expected = cache[f"blocks.{layer}.hook_resid_post"][0, -1].float()
            assert torch.allclose(result.per_example[i, j], expected, atol=1e-4, rtol=1e-4)
    raw = ReversionProbe(REQUESTS, layers=[0, 1], chat_template=False).measure(chat_bridge)
    assert not torch.allclose(raw.per_example, result.per_example, atol=1e-3)


def test_word_tokenizer_keeps_raw_prompts_under_auto(tiny_model):
    auto = ReversionProbe(PROMPTS, layers=[1])
    raw = ReversionProbe(PROMPTS, layers=[1], chat_template=False)
    assert torch.equal(auto.centroid(tiny_model), raw.centroid(tiny_model))
    assert auto.chat_template_used is False


def test_probe_refuses_to_mix_raw_and_templated_models(chat_bridge):
    """Same vocabulary, template removed: "auto" would read raw prompts now, so the probe refuses to compare;
    a probe given the template text reads the template-less tokenizer exactly like the templated one."""
    probe = ReversionProbe(REQUESTS, layers=[1])
    templated = probe.centroid(chat_bridge)
    template = chat_bridge.tokenizer.chat_template
    try:
        chat_bridge.tokenizer.chat_template = None
        with pytest.raises(ProbeError, match="not be comparable"):
            probe.centroid(chat_bridge)
        fixed = ReversionProbe(REQUESTS, layers=[1], chat_template=template)
        assert torch.equal(fixed.centroid(chat_bridge), templated)
    finally:
        chat_bridge.tokenizer.chat_template = template


def test_analyze_reads_every_checkpoint_in_the_aligned_template_and_records_it(chat_bridge, tmp_path, chat_tok):
    """The base model's tokenizer has no template; v_rev still comes from templated readouts of both models."""
    import copy

    from hf_models import save_tiny_llama, tiny_llama

    base_tok = copy.deepcopy(chat_tok)
    base_tok.chat_template = None
    base = load_hf_folder(
        save_tiny_llama(tmp_path / "base", base_tok, seed=1, model=tiny_llama(base_tok, seed=1, dtype=torch.float32))
    )
    tuned = load_hf_folder(
        save_tiny_llama(tmp_path / "tuned", chat_tok, seed=2, model=tiny_llama(chat_tok, seed=2, dtype=torch.float32))
    )
    spec = {"pretrain": base, "align": chat_bridge, "finetune": {"r": {1: tuned}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = revlens.analyze(spec, REQUESTS, layers=[1], progress=False, null_samples=100, system="Be brief.")
    assert report.config["chat_template"] is True and report.config["system"] == "Be brief."

    def centroid(model):
        rows = []
        for prompt in REQUESTS:
            text = user_turn(chat_tok, prompt, "Be brief.")
            tokens = torch.tensor([chat_tok(text, add_special_tokens=False)["input_ids"]])
            _, cache = model.run_with_cache(tokens)
            rows.append(cache["blocks.1.hook_resid_post"][0, -1].double())
        return torch.stack(rows).mean(0)

    v = centroid(base) - centroid(chat_bridge)
    assert torch.allclose(report.v_rev[0].double(), v / v.norm(), atol=1e-4)
    raw = revlens.analyze(spec, REQUESTS, layers=[1], progress=False, null_samples=100, chat_template=False)
    assert raw.config["chat_template"] is False
    assert template_for_history(base, "auto") is False and template_for_history(chat_bridge) == chat_tok.chat_template


def test_monitor_reads_the_aligned_template(chat_bridge):
    monitor = revlens.ReversionMonitor.from_models(chat_bridge, chat_bridge, REQUESTS, layers=[1])
    assert monitor.probe.chat_template == chat_bridge.tokenizer.chat_template
    off = revlens.ReversionMonitor.from_models(chat_bridge, chat_bridge, REQUESTS, layers=[1], chat_template=False)
    assert off.probe.chat_template_used is False


def test_cli_chat_template_flags(monkeypatch, tmp_path):
    from revlens import analysis, cli

    seen = {}

    def fake_analyze(ckpts, prompts=None, *, config, **kwargs):
        seen.update(vars(config))  # the CLI passes its options as an AnalyzeConfig
        raise ValueError("stop here")

    monkeypatch.setattr(analysis, "analyze", fake_analyze)
    assert cli.main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--no-chat-template"]) == 2
    assert seen["chat_template"] is False and seen["system"] is None
    assert cli.main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--system", "Be brief."]) == 2
    assert seen["chat_template"] == "auto" and seen["system"] == "Be brief."
    assert cli.main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--chat-template"]) == 2
    assert seen["chat_template"] is True
