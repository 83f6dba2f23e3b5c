"""Generation at run time: greedy decoding; GemFilter token pruning of long prompts; lossless
speculative decoding with a pruned model, or the model's own first blocks, as the draft; CALM-style
early exit."""

from secateur.generate.early_exit import Exited, early_exit, self_speculative, shallow_view
from secateur.generate.speculative import Decoded, greedy, speculative
from secateur.generate.tokens import Generated, TokenPruning, generate, prune_prompts

__all__ = ["Decoded", "Exited", "Generated", "TokenPruning", "early_exit", "generate", "greedy", "prune_prompts",
           "self_speculative", "shallow_view", "speculative"]
