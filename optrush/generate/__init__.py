"""Text generation: `generate_batch`/`generate_texts` (static KV cache, batched, sampled or greedy, token healing),
`beam_search`, `contrastive_search`, the no-cache reference `generate`/`generate_text` (all drawing through
`optrush.generate.sample.next_tokens`), and `load_for_generation` (a checkpoint, or a base model plus adapter)."""
from optrush.generate.beam import beam_search
from optrush.generate.contrastive import contrastive_search
from optrush.generate.decode import generate_batch, generate_texts
from optrush.generate.load import load_for_generation
from optrush.generate.sample import generate, generate_text

__all__ = ["beam_search", "contrastive_search", "generate", "generate_batch", "generate_text", "generate_texts",
           "load_for_generation"]
