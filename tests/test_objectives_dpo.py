"""The DPO family: every loss equals an independent hand computation, packed log-probs equal unpacked ones, the
reference (frozen copy or cached precomputed log-probs) behaves, and `optrush train objective=dpo` runs."""
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from optrush.config.schema import DataConfig, DPOConfig
from optrush.data.preference import PairLoader, build_preference_datasets, recipe_preference_pairs
from optrush.data.recipes import write_jsonl
from optrush.data.tokenizer import load_tokenizer
from optrush.models.io import build_model
from optrush.models.presets import get_preset
from optrush.objectives.dpo import DPO, precompute_reference_logps, preference_losses, sequence_logps

# two pairs: summed completion log-probs under policy and reference, and completion token counts
C, R, C0, R0 = [-4.0, -9.0], [-6.0, -7.5], [-5.0, -8.0], [-5.5, -8.5]
NC, NR = [4.0, 6.0], [5.0, 3.0]
BETA, EPS, GAMMA = 0.3, 0.1, 0.4


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def hand(loss, i):
    h = (C[i] - C0[i]) - (R[i] - R0[i])
    if loss == "sigmoid":
        return -(1 - EPS) * log_sigmoid(BETA * h) - EPS * log_sigmoid(-BETA * h)
    if loss == "robust":
        return ((1 - EPS) * -log_sigmoid(BETA * h) + EPS * log_sigmoid(-BETA * h)) / (1 - 2 * EPS)
    if loss == "hinge":
        return max(0.0, 1 - BETA * h)
    if loss == "ipo":
        h_avg = (C[i] - C0[i]) / NC[i] - (R[i] - R0[i]) / NR[i]
        return (h_avg - 1 / (2 * BETA)) ** 2
    ac, ar = C[i] / NC[i], R[i] / NR[i]
    if loss == "simpo":
        z = BETA * (ac - ar) - GAMMA
        return -(1 - EPS) * log_sigmoid(z) - EPS * log_sigmoid(-z)
    odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
    return -ac - BETA * log_sigmoid(odds)  # orpo: mean chosen NLL minus beta log sigmoid(log odds ratio)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_losses_equal_hand_computation(loss):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    smoothing = EPS if loss in ("sigmoid", "robust", "simpo") else 0.0
    losses, chosen_rewards, rejected_rewards = preference_losses(
        loss, chosen=t(C), rejected=t(R), chosen_tokens=t(NC), rejected_tokens=t(NR), ref_chosen=t(C0),
        ref_rejected=t(R0), beta=BETA, label_smoothing=smoothing, gamma=GAMMA)
    assert losses.tolist() == pytest.approx([hand(loss, 0), hand(loss, 1)], rel=1e-12, abs=1e-12)
    if loss not in ("simpo", "orpo"):
        assert chosen_rewards.tolist() == pytest.approx([BETA * (C[i] - C0[i]) for i in range(2)])


@pytest.fixture(scope="module")
def pairs(recipe_corpus, tokenizer_dir, tmp_path_factory):
    records = [{**r, "ingredients": r["ingredients"][:2], "directions": r["directions"][:2]}
               for r in recipe_corpus[1][:40]]
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    write_jsonl(recipe_preference_pairs(records, seed=0), path)
    tok = load_tokenizer(tokenizer_dir)
    train, _, _ = build_preference_datasets(DataConfig(path=str(path), max_length=512, format="preference"), tok,
                                            seed=0)
    return path, tok, train


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_packed_and_shared_prompt_log_probs_equal_unpacked(pairs, shared_prompt):
    _, tok, train = pairs
    torch.manual_seed(0)
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)
    packed = next(PairLoader(train[:6], strategy="bfd", rows=2, max_length=512, pad_id=tok.pad_token_id, seed=0,
                             shared_prompt=shared_prompt))
    assert packed.batch.input_ids.shape[0] < packed.num_pairs  # several pairs share a row
    logps, counts = sequence_logps(model, packed)
    by_index = {pair.index: pair for pair in train}
    with torch.no_grad():
        for p, index in enumerate(packed.pair_index.tolist()):
            for side, example in enumerate((by_index[index].chosen, by_index[index].rejected)):
                logits = model(torch.tensor([example.input_ids]))[0].log_softmax(-1)
                labels = torch.tensor(example.labels)
                trained = labels >= 0
                expected = logits[trained.nonzero().flatten(), labels[trained]].sum()
                assert float(logps[2 * p + side]) == pytest.approx(float(expected), abs=1e-4)
                assert float(counts[2 * p + side]) == example.num_trained


def test_flex_shared_prompt_mask_equals_the_dense_one(pairs):
    """The FlexAttention backend of shared-prompt rows (model.attention=flex) computes what the dense SDPA mask
    does (forward on CPU: FlexAttention has no CPU backward; the GPU runs the same mask_mod compiled)."""
    from optrush.kernels.attention import FLEX
    from optrush.objectives.dpo import pair_forward, shared_prompt_block_mask, shared_prompt_mask

    _, tok, train = pairs
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)  # 4 query heads over 2 KV heads
    shared = next(PairLoader(train[:6], strategy="bfd", rows=2, max_length=512, pad_id=tok.pad_token_id, seed=0,
                             shared_prompt=True))
    b = shared.batch
    segments = torch.stack([b.document_ids.long(), shared.branch_ids], dim=-1)
    T = b.input_ids.shape[1]
    block = shared_prompt_block_mask(segments, seq_len=T)
    dense = shared_prompt_mask(segments, seq_len=T)
    # a block is computed exactly where the dense mask has a visible pair (blocks between pairs are skipped)
    n = -(-T // 128)
    padded = torch.nn.functional.pad(dense[:, 0], (0, n * 128 - T, 0, n * 128 - T))
    any_visible = padded.view(-1, n, 128, n, 128).any(dim=(2, 4))
    assert torch.equal(block.to_dense()[:, 0].bool(), any_visible) and not any_visible.all()
    with torch.no_grad():
        reference = pair_forward(model, shared)
        model.set_attention_backend(FLEX)
        flex = pair_forward(model, shared)
    assert model.attention_backend is FLEX  # restored after the pair forward
    real = (b.document_ids >= 0)
    torch.testing.assert_close(flex[real], reference[real], atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
def test_flex_shared_prompt_dpo_trains_like_the_dense_mask_on_gpu(pairs):
    """The compiled FlexAttention kernel with the shared-prompt mask, forward and backward: the DPO loss and every
    gradient equal the dense SDPA mask's (CPU cannot run flex's backward)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from optrush.kernels.attention import FLEX

    _, tok, train = pairs
    shared = next(PairLoader(train[:6], strategy="bfd", rows=2, max_length=512, pad_id=tok.pad_token_id, seed=0,
                             shared_prompt=True)).to("cuda")
    objective = DPO(cfg=DPOConfig(), reference_logps=torch.zeros(len(train), 2, device="cuda"))
    results = []
    for backend in (None, FLEX):
        model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0, device="cuda")
        if backend is not None:
            model.set_attention_backend(backend)
        loss, _ = objective(model, shared)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (dense_loss, dense_grads), (flex_loss, flex_grads) = results
    torch.testing.assert_close(flex_loss, dense_loss, atol=1e-5, rtol=1e-4)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_shared_prompt_rewards_equal_separate_sequences(pairs):
    from optrush.objectives.reward import apply_reward_head, sequence_rewards

    _, tok, train = pairs
    model = apply_reward_head(build_model(get_preset("debug", vocab_size=len(tok)), seed=0))
    kwargs = dict(strategy="bfd", rows=2, max_length=512, pad_id=tok.pad_token_id, seed=0, shuffle=False)
    separate, shared = next(PairLoader(train[:6], **kwargs)), next(PairLoader(train[:6], shared_prompt=True, **kwargs))
    assert shared.input_ids.numel() - shared.num_padding < separate.input_ids.numel() - separate.num_padding
    with torch.no_grad():
        by_pair = dict(zip(separate.pair_index.tolist(), sequence_rewards(model, separate).view(-1, 2)))
        for index, rewards in zip(shared.pair_index.tolist(), sequence_rewards(model, shared).view(-1, 2)):
            assert torch.allclose(rewards, by_pair[index], atol=1e-5)


def test_reference_copy_and_precomputed_agree_and_cache(pairs, tmp_path):
    _, tok, train = pairs
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)
    reference = build_model(get_preset("debug", vocab_size=len(tok)), seed=0).requires_grad_(False)
    cache = tmp_path / "ref.pt"
    table = precompute_reference_logps(model, train, cache=cache, pad_id=tok.pad_token_id, max_length=512, rows=4)
    assert cache.is_file() and table.shape == (len(train), 2)
    again = precompute_reference_logps(model, train, cache=cache, pad_id=tok.pad_token_id, max_length=512, rows=4)
    assert torch.equal(again, table)
    batch = next(PairLoader(train, strategy="bfd", rows=2, max_length=512, pad_id=tok.pad_token_id, seed=1))
    with_copy = DPO(cfg=DPOConfig(), reference=reference)
    with_table = DPO(cfg=DPOConfig(), reference_logps=table)
    assert torch.allclose(with_copy.reference_of(model, batch), with_table.reference_of(model, batch), atol=1e-4)
    loss_sum, metrics = with_copy(model, batch)  # policy == reference: every pair's loss is log 2
    assert float(loss_sum.detach()) / batch.num_pairs == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_disabled_reference_equals_the_frozen_copy(pairs, method):
    from optrush.config.schema import PeftConfig
    from optrush.objectives import frozen_copy
    from optrush.peft.lora import apply_lora

    _, tok, train = pairs
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)
    with_copy = DPO(cfg=DPOConfig(reference="copy"), reference=frozen_copy(model))
    model = apply_lora(model, PeftConfig(method=method, r=4, alpha=8))
    disabled = DPO(cfg=DPOConfig(reference="lora_disabled"))
    batch = next(PairLoader(train, strategy="bfd", rows=1, max_length=512, pad_id=tok.pad_token_id, seed=1))
    # zero-initialised B: policy, copy and adapters-off reference all agree before training
    torch.testing.assert_close(disabled.reference_of(model, batch), with_copy.reference_of(model, batch))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss_sum, _ = disabled(model, batch)
    loss_sum.backward()
    optimizer.step()
    policy = sequence_logps(model, batch)[0].detach()
    reference = disabled.reference_of(model, batch)
    assert not torch.allclose(policy, reference, atol=1e-3)  # the step moved the policy away from the reference
    torch.testing.assert_close(reference, with_copy.reference_of(model, batch))  # which is still the copy
    torch.testing.assert_close(disabled(model, batch)[0], with_copy(model, batch)[0])
    assert torch.allclose(sequence_logps(model, batch)[0], policy)  # adapters are back on after the block


def test_lora_disabled_needs_lora(debug_overrides):
    from optrush.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="dpo.reference=lora_disabled"):
        load_config(None, [*debug_overrides, "objective=dpo", "data.format=preference", "dpo.reference=lora_disabled"])


@pytest.mark.parametrize("extra", [["dpo.loss=sigmoid", "dpo.reference=precomputed", "dpo.label_smoothing=0.1"],
                                   ["dpo.loss=simpo"], ["dpo.loss=ipo", "data.shared_prompt=true"],
                                   ["dpo.reference=lora_disabled", "peft.method=lora", "peft.r=4"],
                                   ["data.packing=sorted", "data.batch_tokens=512"]])
def test_dpo_trains_end_to_end_through_the_cli(pairs, debug_overrides, tmp_path, extra):
    from optrush.cli.main import main

    path, _, _ = pairs
    assert main(["train", *debug_overrides, f"data.path={path}", "objective=dpo", "data.format=preference",
                 "data.max_length=256", "train.max_steps=3", "train.lr=1e-3", *extra]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and all(math.isfinite(loss) for loss in summary["losses"])
    if "dpo.loss=ipo" not in extra and "dpo.loss=simpo" not in extra:
        # the first step's policy is the reference, so the (smoothed) sigmoid loss starts exactly at log 2
        assert summary["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
        assert (tmp_path / "run" / "reference_logps.pt").is_file() == ("dpo.reference=precomputed" in extra)


class NewVocabTensors(TorchDispatchMode):
    """Records the most elements of any float tensor an op allocates (not a view or an in-place result of its inputs)
    whose last dimension is the vocabulary: logits, log-softmax and their gradients, in forward and backward."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.most = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.most = max(self.most, t.numel())
        return out


def test_fused_loss_log_probs_equal_full_logits_and_never_hold_them(pairs):
    """kernels.fused_loss=true: the same DPO loss and gradients (policy and copy reference chunked), and no
    tensor of (tokens x vocab) anywhere in forward or backward; chunks of 7 do not divide the token count."""
    from optrush.config.schema import Config, KernelsConfig
    from optrush.objectives import build_objective

    _, tok, train = pairs
    # rows of 400 (not the vocabulary's 512), so that no (T x T) attention mask counts as a vocabulary block
    batch = next(PairLoader(train[:6], strategy="bfd", rows=2, max_length=400, pad_id=tok.pad_token_id, seed=0,
                            shared_prompt=True))
    tokens, vocab, chunk = batch.input_ids.numel(), len(tok), 7
    assert tokens % chunk and (batch.batch.labels == -100).any()
    results = {}
    for fused in (False, True):
        model = build_model(get_preset("debug", vocab_size=vocab), seed=0)
        cfg = Config(kernels=KernelsConfig(fused_loss=fused, loss_chunk_tokens=chunk))
        objective = build_objective("dpo", cfg=cfg, model=model, tokenizer=tok, examples=train)
        with torch.no_grad():  # a reference unlike the policy: non-zero log-ratios
            for p in objective.reference.parameters():
                p.mul_(1.05)
        memory = NewVocabTensors(vocab)
        with memory:
            loss_sum, _ = objective(model, batch)
            loss_sum.backward()
        results[fused] = loss_sum.detach(), {n: p.grad for n, p in model.named_parameters()}, memory.most
    (loss, grads, most), (fused_loss, fused_grads, fused_most) = results[False], results[True]
    assert abs(float(loss) - batch.num_pairs * math.log(2)) > 1e-3
    torch.testing.assert_close(fused_loss, loss, atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-4)
    assert most >= tokens * vocab  # the full-logits path does hold them: the counter sees them
    assert fused_most == chunk * vocab  # one chunk of logits at a time (which the counter sees)


@pytest.mark.parametrize("average_chosen", [-1e-9, -3e-8, -1e-4, -30.0])
def test_orpo_log_odds_stay_exact_as_the_chosen_probability_nears_one(average_chosen):
    """In fp32, exp(a) rounds to 1 for a above -6e-8: log(1 - exp(a)) would give an infinite log odds ratio and
    NaN gradients. The fp32 loss and gradients equal the fp64 ones, at every distance from 0."""
    def orpo(dtype):
        chosen = torch.tensor([average_chosen * 4], dtype=dtype, requires_grad=True)
        losses, _, _ = preference_losses("orpo", chosen=chosen, rejected=torch.tensor([-9.0], dtype=dtype),
                                         chosen_tokens=torch.tensor([4.0], dtype=dtype),
                                         rejected_tokens=torch.tensor([3.0], dtype=dtype), ref_chosen=None,
                                         ref_rejected=None, beta=BETA)
        losses.sum().backward()
        return losses.detach().double(), chosen.grad.double()

    (loss32, grad32), (loss64, grad64) = orpo(torch.float32), orpo(torch.float64)
    assert torch.isfinite(grad32).all()
    torch.testing.assert_close(loss32, loss64, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad32, grad64, rtol=1e-5, atol=1e-9)


def test_dpo_skips_a_malformed_pair_under_on_error_skip(pairs, debug_overrides, tmp_path):
    from optrush.cli.main import main

    path, _, _ = pairs
    lines = path.read_text().splitlines()
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines[:3] + ['{"prompt": "question: soup", "chosen": " yes", '] + lines[3:10]) + "\n")
    assert main(["train", *debug_overrides, f"data.path={data}", "objective=dpo", "data.format=preference",
                 "data.max_length=256", "train.max_steps=1", "data.on_error=skip"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["train"]["rejected"] == 1 and summary["data"]["train_pairs"] == 10
    assert json.loads((tmp_path / "pairs.jsonl.rejects.jsonl").read_text())["where"].endswith("pairs.jsonl:4")
