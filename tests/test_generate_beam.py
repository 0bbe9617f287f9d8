"""Beam search equals transformers' beam search (no EOS) on a tiny random Llama; one beam is greedy."""
import pytest
import torch

from optrush.generate.beam import beam_search
from optrush.generate.decode import generate_batch
from optrush.models import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.15)
    path = tmp_path_factory.mktemp("beam")
    hf.save_pretrained(path)
    return hf, load_model(path)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_equals_transformers(models, num_beams):
    hf, native = models
    prompt = [5, 9, 2, 33, 17]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, num_beams=num_beams, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert beam_search(native, prompt, num_beams=num_beams, max_new_tokens=12) == expected


def test_one_beam_is_greedy_and_eos_ends(models):
    _, native = models
    greedy = generate_batch(native, [[1, 2, 3]], max_new_tokens=10, temperature=0)[0]
    assert beam_search(native, [1, 2, 3], num_beams=1, max_new_tokens=10) == greedy
    out = beam_search(native, [1, 2, 3], num_beams=1, max_new_tokens=10, eos_id=greedy[4])
    assert out == greedy[:greedy.index(greedy[4]) + 1]


def test_prompt_may_be_a_tensor_and_an_empty_one_is_refused(models):
    from optrush.generate.contrastive import contrastive_search

    _, native = models
    prompt = [5, 9, 2]
    for search, kwargs in ((beam_search, dict(num_beams=2)), (contrastive_search, dict(penalty_alpha=0.6, top_k=3))):
        expected = search(native, prompt, max_new_tokens=4, **kwargs)
        assert search(native, torch.tensor([prompt]), max_new_tokens=4, **kwargs) == expected
        assert search(native, torch.tensor(prompt), max_new_tokens=4, **kwargs) == expected
        for bad in ([], torch.zeros(2, 3, dtype=torch.long)):
            with pytest.raises(ValueError, match="give one non-empty prompt"):
                search(native, bad, max_new_tokens=4, **kwargs)
