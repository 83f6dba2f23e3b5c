"""Generation at run time: greedy decoding, and lossless speculative decoding with a pruned model as
the draft of its original."""

from secateur.generate.speculative import Decoded, greedy, speculative

__all__ = ["Decoded", "greedy", "speculative"]
