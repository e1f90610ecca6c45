"""Adapter Guidance Distillation (Jensen et al., arXiv 2503.07274): guided predictions in one pass.

Small adapters, attached to the model's attention blocks, take the guidance scale ω and the prompt
and learn to turn the conditional prediction into the CFG prediction, so each step costs one model
evaluation instead of two.

- :mod:`.adapters`: the adapter modules, the loss, and their file (``fastguidance.adapters``).
- :mod:`.training`: collecting CFG trajectories within a memory limit and distilling them.
- :mod:`.policy`: the engine policy (every step one guided evaluation, composed with the others).

The host glue that attaches them to ComfyUI's models is ``nodes/adapter_patch.py``.
"""
