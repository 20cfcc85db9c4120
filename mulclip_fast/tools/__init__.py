"""Command-line reports about the ops, kept out of the op layer: they import the ops, the ops never import them.

- ``python -m mulclip_fast.tools.memory_report``: exact peak memory of the matched-pair ops, fused vs reference.
- ``python -m mulclip_fast.tools.pairwise_report``: peak memory and time of the all-pairs ops.
- ``python -m mulclip_fast.tools.extension_report``: the C++ twin of the extension against the torch path, time
  and peak memory of SAP's top-k aggregate.
- ``python -m mulclip_fast.tools.packed_text_report``: packed against padded text, tokens, time and peak memory
  of a training step.
"""
