"""The demos: clients of revlens' public API, in one place; core modules never import them.

- :mod:`revlens.demos.organism`: the model organism (a small transformer trained from scratch on a synthetic
  chat world) and its demo, ``revlens demo --preset tiny``;
- :mod:`revlens.demos.chat_model`: the real-model pipeline on any local chat model,
  ``revlens demo --model DIR_OR_GGUF`` or ``--preset smollm2`` / ``qwen2.5-coder-0.5b``;
- :mod:`revlens.demos.comparison`: the one blocking comparison both demos run (the order of the runs, the best
  mode, the table);
- :mod:`revlens.demos.cli`: the ``revlens demo`` subcommand.

They import ``revlens`` only through ``from revlens import NAME`` (names of ``revlens.__all__``) and each other
(``tests/test_demo_imports.py`` checks it).
"""
