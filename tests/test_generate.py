"""KV-cache decoding: cached logits equal the no-cache forward, batched ragged prompts equal one by one, greedy
equals transformers' generate, sampling filters (top-k, min-p, repetition penalty), EOS, stop strings, streaming."""
import pytest
import torch

from optrush.generate.decode import cut_at_stop, generate_batch, generate_texts
from optrush.generate.sample import Sampling, next_tokens
from optrush.models import build_model
from optrush.models.kv_cache import KVCache
from optrush.models.llama import ModelArgs

VOCAB = 64
VARIANTS = {
    "llama": dict(),
    "qwen3-qk-norm-bias": dict(qk_norm=True, qkv_bias=True),
    "mistral-sliding-window": dict(sliding_window=5),
}


def tiny_model(seed=0, **kw):
    args = ModelArgs(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64, **kw)
    model = build_model(args, seed=seed)
    with torch.no_grad():  # weights large enough that the logits differ clearly between tokens
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_the_full_forward(variant):
    torch.manual_seed(0)
    model = tiny_model(**VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2, max_len=20)
        prefix = 6
        pos = torch.arange(20).expand(2, 20)
        got = [model(ids[:, :prefix], position_ids=pos[:, :prefix], cache=cache, cache_position=torch.arange(prefix))]
        for t in range(prefix, 14):
            got.append(model(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], cache=cache,
                             cache_position=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ragged_batch_equals_one_by_one(variant):
    torch.manual_seed(1)
    model = tiny_model(**VARIANTS[variant])
    prompts = [[3, 4, 5], [7, 1, 2, 9, 9, 10, 11], [5]]
    batched = generate_batch(model, prompts, max_new_tokens=9, temperature=0)
    alone = [generate_batch(model, [p], max_new_tokens=9, temperature=0)[0] for p in prompts]
    assert batched == alone and all(len(row) == 9 for row in batched)


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    from optrush.models import load_model

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.15)
    hf.save_pretrained(tmp_path)
    native = load_model(tmp_path)
    prompt = [[5, 9, 2, 33, 17]]
    expected = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 5:].tolist()
    assert generate_batch(native, prompt, max_new_tokens=20, temperature=0) == [expected]
    expected = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                           repetition_penalty=1.3)[0, 5:].tolist()
    assert generate_batch(native, prompt, max_new_tokens=20, temperature=0, repetition_penalty=1.3) == [expected]


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = torch.zeros(1, 4, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)

    def draws(**kw):
        return {int(next_tokens(logits, seen, Sampling(**kw), gen)) for _ in range(200)}

    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}
    assert draws(min_p=0.5) == {0, 1}  # 0.3 >= 0.5 * 0.5; 0.15 is not
    assert draws(min_p=0.0) == {0, 1, 2, 3}
    penalised = torch.tensor([[2.0, -1.0, 1.5, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert int(next_tokens(penalised, seen, Sampling(temperature=0, repetition_penalty=2.0), None)) == 2
    with pytest.raises(ValueError, match="min_p=2"):
        Sampling(min_p=2)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny_model()
    run = lambda seed, **kw: generate_batch(model, [[1, 2], [3]], max_new_tokens=8,
                                            generator=torch.Generator().manual_seed(seed), **kw)
    assert run(0, temperature=0.9, top_p=0.9, min_p=0.05) == run(0, temperature=0.9, top_p=0.9, min_p=0.05)
    assert run(3, temperature=2.0, top_k=1) == generate_batch(model, [[1, 2], [3]], max_new_tokens=8, temperature=0)
    assert len({tuple(map(tuple, run(seed, temperature=3.0))) for seed in range(4)}) > 1


def test_eos_ends_each_row_and_streams():
    model = tiny_model()
    greedy = generate_batch(model, [[1, 2], [9, 8, 7]], max_new_tokens=10, temperature=0)
    eos = greedy[0][3]
    streamed = []
    rows = generate_batch(model, [[1, 2], [9, 8, 7]], max_new_tokens=10, temperature=0, eos_id=eos,
                          on_token=lambda row, tok: streamed.append((row, tok)))
    assert rows[0] == greedy[0][:greedy[0].index(eos) + 1]
    assert rows[1] == (greedy[1][:greedy[1].index(eos) + 1] if eos in greedy[1] else greedy[1])
    assert [t for r, t in streamed if r == 0] == rows[0] and [t for r, t in streamed if r == 1] == rows[1]
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate_batch(model, [[1] * 60], max_new_tokens=10)


class CharTokenizer:
    """The slice of the transformers tokenizer interface generate_texts uses: token i is chr(ord('a') + i)."""
    eos_token_id, pad_token_id = None, 0

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i + ord("a")) for i in ids)


def test_stop_strings_and_text_streaming():
    model = tiny_model()
    tok = CharTokenizer()
    full = generate_texts(model, tok, ["abc"], max_new_tokens=12, temperature=0)[0]
    stop = full[4:6]
    pieces = []
    text = generate_texts(model, tok, ["abc"], max_new_tokens=12, temperature=0, stop=[stop],
                          on_text=lambda row, piece: pieces.append(piece))[0]
    assert text == cut_at_stop(full, [stop]) and stop not in text
    assert "".join(pieces) == text
