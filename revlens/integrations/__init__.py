"""Bridges from revlens to other training stacks.

- :mod:`revlens.integrations.transformers`: a ``TrainerCallback`` that logs alignment with v_rev, and a
  Trainer (or TRL ``SFTTrainer``) that trains with :class:`~revlens.blocking.Blocking` hooks and the
  probe anchor (needs ``transformers``: ``pip install revlens[transformers]``);
- :mod:`revlens.integrations.hf_hooks`: forward hooks on a plain Hugging Face module's decoder layers
  (no extra dependency), which blocking and the anchor use on models that are not TransformerBridges.

Importing this package imports neither transformers nor TRL.
"""
