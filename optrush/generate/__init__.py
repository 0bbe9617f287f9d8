"""Text generation: `generate_batch`/`generate_texts` (static KV cache, batched, sampled or greedy), `beam_search`,
and the no-cache reference sampler `generate`/`generate_text`."""
from optrush.generate.beam import beam_search
from optrush.generate.decode import generate_batch, generate_texts
from optrush.generate.sample import generate, generate_text

__all__ = ["beam_search", "generate", "generate_batch", "generate_text", "generate_texts"]
