"""The shared sampler (`next_tokens`) and the no-cache reference decoder: greedy, eos stopping, top-k/top-p,
seeded reproducibility, eval-mode handling, and the KV-cache decoder drawing the very same tokens."""
import pytest
import torch
from torch import nn

from optrush.generate import generate, generate_text
from optrush.generate.sample import Sampling, next_tokens

VOCAB = 13


class TinyLM(nn.Module):
    """Stand-in with the model's forward signature: a random bigram table plus a little context mixing."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)
        self.dropout = nn.Dropout(0.5)  # would make outputs random if generate left the model in train mode

    def forward(self, input_ids, *, position_ids=None, document_ids=None, labels=None, reduction="mean"):
        h = self.embed(input_ids)
        return self.head(self.dropout(h + 0.5 * h.cumsum(dim=1) / torch.arange(1, h.shape[1] + 1)[:, None]))


class Counter(nn.Module):
    """Always predicts last token + 1 (mod VOCAB)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, *, position_ids=None, document_ids=None, labels=None, reduction="mean"):
        return 10.0 * nn.functional.one_hot((input_ids + 1) % VOCAB, VOCAB).float()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyLM().train()


def test_greedy_is_deterministic_and_restores_train_mode(model):
    first = generate(model, [1, 2, 3], max_new_tokens=8, temperature=0)
    assert len(first) == 8 and all(0 <= t < VOCAB for t in first)
    assert generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=8, temperature=0) == first
    assert model.training and model.dropout.training


def test_stops_at_eos_and_includes_it():
    assert generate(Counter(), [3], max_new_tokens=10, temperature=0) == list(range(4, 13)) + [0]
    assert generate(Counter(), [3], max_new_tokens=10, temperature=0, eos_id=6) == [4, 5, 6]
    assert generate(Counter(), [3], max_new_tokens=10, temperature=0, eos_id=[9, 5]) == [4, 5]


def test_top_k_1_equals_greedy(model):
    greedy = generate(model, [4, 5], max_new_tokens=6, temperature=0)
    gen = torch.Generator().manual_seed(1)
    assert generate(model, [4, 5], max_new_tokens=6, temperature=1.5, top_k=1, generator=gen) == greedy


def test_seeded_sampling_is_reproducible(model):
    def run(seed, **kw):
        return generate(model, [7], max_new_tokens=12, generator=torch.Generator().manual_seed(seed), **kw)

    assert run(0, temperature=0.8, top_p=0.9) == run(0, temperature=0.8, top_p=0.9)
    assert run(0, temperature=1.0, top_k=5) == run(0, temperature=1.0, top_k=5)
    runs = {tuple(run(seed, temperature=2.0)) for seed in range(5)}
    assert len(runs) > 1  # sampling does sample


def test_top_k_and_top_p_cut_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros(1, 4, dtype=torch.bool)
    draws = lambda **kw: {int(next_tokens(logits, seen, Sampling(**kw), gen)) for _ in range(200)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7, so token 1 is needed too; 0.8 >= 0.7 stops
    assert draws(top_p=0.5) == {0}
    assert draws() == {0, 1, 2, 3}
    allowed = torch.tensor([[False, True, False, True]])
    assert {int(next_tokens(logits, seen, Sampling(), gen, allowed=allowed)) for _ in range(100)} == {1, 3}


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_decoding_from_non_finite_logits_names_the_row_and_the_cause(bad, temperature):
    logits = torch.zeros(2, 4)
    logits[1, 2] = bad
    seen = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(FloatingPointError, match=r"NaN or infinite \(batch rows \[1\]\).*diverged"):
        next_tokens(logits, seen, Sampling(temperature=temperature), torch.Generator().manual_seed(0))
    logits[1, 2] = 0.0
    logits[0, 1] = float("-inf")  # a token ruled out is no fault while others are left
    assert next_tokens(logits, seen, Sampling(temperature=temperature), torch.Generator().manual_seed(0)).shape == (2,)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(model, [1], max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(model, [1], max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="one non-empty prompt"):
        generate(model, torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)


class CharTokenizer:
    """The slice of the transformers tokenizer interface generate_text uses."""
    eos_token_id = 0

    def encode(self, text):
        return [ord(c) - ord("a") + 1 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i + ord("a") - 1) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


def test_generate_text():
    assert generate_text(Counter(), CharTokenizer(), "ij", max_new_tokens=10, temperature=0) == "kl"  # l+1 wraps to eos


def test_cached_decoder_draws_the_same_tokens_as_the_reference():
    from optrush.generate.decode import generate_batch
    from optrush.models import build_model
    from optrush.models.llama import ModelArgs

    model = build_model(ModelArgs(vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                  max_seq_len=64), seed=0)
    kw = dict(max_new_tokens=10, temperature=1.3, top_k=20, top_p=0.95, min_p=0.02, repetition_penalty=1.2)
    reference = generate(model, [3, 9, 4], generator=torch.Generator().manual_seed(5), **kw)
    assert generate_batch(model, [[3, 9, 4]], generator=torch.Generator().manual_seed(5), **kw) == [reference]
