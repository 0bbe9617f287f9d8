"""Contrastive search and token healing: the cached contrastive search equals a no-cache hand computation of
transformers' definition (alpha 0 is greedy); token healing on a prompt cut mid-word completes the word."""
import torch
import torch.nn.functional as F

from optrush.generate.contrastive import contrastive_search
from optrush.generate.decode import generate_batch, generate_texts
from optrush.generate.healing import heal_prompts
from optrush.models import build_model
from optrush.models.llama import ModelArgs


def tiny_model(vocab_size=64, seed=0):
    model = build_model(ModelArgs(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                  max_seq_len=64), seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.15)
    return model.eval()


def by_hand(model, prompt, *, alpha, k, steps):
    """Every candidate sequence re-run from scratch; h = the final norm's output, as transformers reads it."""
    captured = []
    hook = model.norm.register_forward_hook(lambda m, a, out: captured.append(out))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            context = captured.pop()[0]
            probs, candidates = F.softmax(logits, dim=-1).topk(k)
            scores = []
            for p, c in zip(probs.tolist(), candidates.tolist()):
                model(torch.tensor([ids + [c]]))
                h = captured.pop()[0, -1]
                penalty = max(float(F.cosine_similarity(h, context[j], dim=0)) for j in range(len(context)))
                scores.append((1 - alpha) * p - alpha * penalty)
            ids.append(candidates.tolist()[max(range(k), key=scores.__getitem__)])
    hook.remove()
    return ids[len(prompt):]


def test_contrastive_search_equals_the_hand_computation():
    model = tiny_model()
    prompt = [5, 9, 2, 33, 17]
    got = contrastive_search(model, prompt, penalty_alpha=0.6, top_k=4, max_new_tokens=8)
    assert got == by_hand(model, prompt, alpha=0.6, k=4, steps=8)
    assert got != contrastive_search(model, prompt, penalty_alpha=0.0, top_k=4, max_new_tokens=8)
    assert contrastive_search(model, prompt, penalty_alpha=0.0, top_k=3, max_new_tokens=8) == \
        generate_batch(model, [prompt], max_new_tokens=8, temperature=0)[0]
    eos = got[3]
    assert contrastive_search(model, prompt, penalty_alpha=0.6, top_k=4, max_new_tokens=8, eos_id=eos) == \
        got[:got.index(eos) + 1]


def test_token_healing_completes_a_word_cut_mid_way(tokenizer_dir):
    from optrush.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    prompt = "Preheat the ov"
    ids = tok.encode(prompt)
    healed, removed, allowed = heal_prompts(tok, [ids], vocab_size=len(tok), device="cpu")
    assert healed == [ids[:-1]] and prompt.endswith(removed[0]) and removed[0]
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    assert all(texts[i].startswith(removed[0]) for i in allowed[0].nonzero().flatten().tolist())
    assert allowed[0, ids[-1]]  # the removed token itself stays allowed
    model = tiny_model(vocab_size=len(tok))
    plain = generate_texts(model, tok, [prompt], max_new_tokens=6, temperature=0)[0]
    pieces = []
    out = generate_texts(model, tok, [prompt], max_new_tokens=6, temperature=0, token_healing=True,
                         on_text=lambda row, piece: pieces.append(piece))[0]
    first = generate_batch(model, healed, max_new_tokens=1, temperature=0, first_allowed=allowed)[0][0]
    assert texts[first].startswith(removed[0])
    assert (prompt + out).startswith(prompt[:-len(removed[0])] + texts[first]) and "".join(pieces) == out
    assert out != plain or texts[first] == removed[0]
