"""The DPO family equals TRL's own loss code (TRL 1.16, the `dev` extra) on the same fixed per-sequence log-probs.

TRL's losses are methods of its trainers, and building a trainer needs a model, a tokenizer and a dataset. The
tests call the real methods on an instance made with `object.__new__` (no `__init__`), with only the attributes
those methods read set as `__init__` would set them from the trainer's config:

- DPO, IPO, hinge, robust: `DPOTrainer._compute_loss` (TRL 1.x has no separate `dpo_loss`), given a stand-in model
  that returns the per-token log-probs of TRL's fused LM head and summed reference log-probs passed as precomputed
  (`precompute_ref_log_probs=True`);
- SimPO: `CPOTrainer.cpo_loss` with `loss_type="simpo"` on average log-probs (`cpo_alpha=0`: no NLL term);
- ORPO: `ORPOTrainer.odds_ratio_loss` on average log-probs;
- the sum/average log-prob conventions: `CPOTrainer.get_batch_logps` on logits against optrush's `token_logps`.

Convention differences (documented choices of optrush, not tested as equal):
- `dpo.loss=sigmoid` with `dpo.label_smoothing > 0`: optrush smooths as cDPO; TRL 1.16's DPOTrainer applies label
  smoothing only to robust/EXO/AOT and ignores it for sigmoid. The cDPO form is compared against TRL's
  `CPOTrainer.cpo_loss` sigmoid, which is the same function of the chosen-minus-rejected score, fed the log-ratios.
- ORPO's NLL term: TRL takes the token-mean NLL of prompt and completion over all chosen sequences of the batch;
  optrush takes each pair's mean completion NLL, -(chosen average log-prob). The odds-ratio term is compared.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from optrush.data.batch import IGNORE_INDEX
from optrush.objectives.dpo import preference_losses
from optrush.objectives.logps import token_logps

pytest.importorskip("trl")
from trl import DPOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

# four pairs: summed completion log-probs under policy (C, R) and reference (C0, R0), completion token counts;
# h = (C - C0) - (R - R0) = 1.5, -2, 0.5, 3.5, so the hinge is active for some pairs and not others
C, R = [-4.0, -9.0, -12.5, -3.0], [-6.0, -7.5, -11.0, -8.0]
C0, R0 = [-5.0, -8.0, -12.0, -4.5], [-5.5, -8.5, -10.0, -6.0]
NC, NR = [4, 6, 5, 3], [5, 3, 7, 4]


def t(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


class SingleProcess:
    """The slice of `accelerate.Accelerator` the loss methods read: one CPU process, so gathering is identity."""
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


class FusedHeadLogps(torch.nn.Module):
    """Stands in for a model patched with TRL's fused LM head: `model(..., labels=, fused_lm_head=True)` returns
    (2P, T - 1) log-probs of the next-token labels, 0 where the label is -100. Each sequence's fixed summed
    log-prob is spread evenly over its labelled positions, so TRL's own masking and summing recover it."""

    def __init__(self, logps: torch.Tensor):
        super().__init__()
        self.logps = logps

    def forward(self, input_ids, *, attention_mask, use_cache, labels, fused_lm_head):
        trained = (labels[:, 1:] != -100).to(self.logps.dtype)
        per_token = trained * (self.logps / trained.sum(1))[:, None]
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def preference_inputs() -> dict[str, torch.Tensor]:
    """TRL's padded preference batch: chosen rows then rejected rows, one prompt token, then the completion."""
    lengths = NC + NR
    T = 1 + max(lengths) + 1
    positions = torch.arange(T)
    n = torch.tensor(lengths)[:, None]
    completion = ((positions >= 1) & (positions <= n)).long()
    return {"input_ids": torch.ones(len(lengths), T, dtype=torch.long), "attention_mask": (positions <= n).long(),
            "completion_mask": completion, "ref_chosen_logps": t(C0), "ref_rejected_logps": t(R0)}


def trl_dpo(loss: str, *, beta: float, label_smoothing: float, policy: torch.Tensor):
    """(mean loss, metrics) of TRL's `DPOTrainer._compute_loss` on the fixed batch."""
    trainer = object.__new__(DPOTrainer)
    model = FusedHeadLogps(policy)
    # what DPOTrainer.__init__ sets from DPOConfig(loss_type=[loss], beta=beta, label_smoothing=label_smoothing,
    # precompute_ref_log_probs=True) and its defaults, and what _compute_loss reads
    trainer.model, trainer.accelerator = model, SingleProcess()
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer.loss_types, trainer.loss_weights = [loss], [1.0]
    trainer.precompute_ref_logps, trainer.ld_alpha, trainer.f_divergence_type = True, None, "reverse_kl"
    trainer.use_weighting, trainer.aux_loss_enabled = False, False
    trainer._metrics, trainer._total_train_tokens, trainer._tp_size = defaultdict(lambda: defaultdict(list)), 0, 1
    loss_value = trainer._compute_loss(model, preference_inputs(), return_outputs=False)
    return loss_value, {k: v[0] for k, v in trainer._metrics["train"].items()}


def optrush_losses(loss: str, *, beta: float, label_smoothing: float, chosen, rejected, gamma: float = 0.0):
    return preference_losses(loss, chosen=chosen, rejected=rejected, chosen_tokens=t(NC), rejected_tokens=t(NR),
                             ref_chosen=t(C0), ref_rejected=t(R0), beta=beta, label_smoothing=label_smoothing,
                             gamma=gamma)


def trainer_with(cls, **attributes):
    """A CPO/ORPO trainer without a model: `cpo_loss` and `odds_ratio_loss` read only these attributes."""
    trainer = object.__new__(cls)
    trainer.accelerator = SingleProcess()
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, inputs: list[torch.Tensor]):
    """Equal values and equal gradients with respect to the policy log-probs."""
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12, abs=1e-12)
    ours_grads = torch.autograd.grad(ours, inputs)
    theirs_grads = torch.autograd.grad(theirs, inputs)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0),
                                                  ("robust", 0.1), ("robust", 0.3),
                                                  ("ipo", 0.1), ("hinge", 0.1)])  # both ignore the smoothing
def test_dpo_losses_equal_trl_dpo_trainer(loss, label_smoothing, beta):
    chosen, rejected = t(C, grad=True), t(R, grad=True)
    ours, chosen_rewards, rejected_rewards = optrush_losses(loss, beta=beta, label_smoothing=label_smoothing,
                                                            chosen=chosen, rejected=rejected)
    theirs, metrics = trl_dpo(loss, beta=beta, label_smoothing=label_smoothing, policy=torch.cat([chosen, rejected]))
    assert_same(ours.mean(), theirs, [chosen, rejected])  # TRL means over pairs; optrush sums, the loop divides
    if loss == "hinge" and beta == 0.5:
        assert 0 < int((ours == 0).sum()) < len(C)  # some pairs past the margin (zero gradient), some not
    margins = chosen_rewards - rejected_rewards
    assert metrics["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), rel=1e-12)
    assert metrics["rewards/rejected"] == pytest.approx(float(rejected_rewards.mean()), rel=1e-12)
    assert metrics["rewards/margins"] == pytest.approx(float(margins.mean()), rel=1e-12)
    assert metrics["rewards/accuracies"] == pytest.approx(float((margins > 0).double().mean()))


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.1), (0.5, 0.25)])
def test_smoothed_sigmoid_equals_trl_cdpo_form(beta, label_smoothing):
    """cDPO: TRL 1.16's DPOTrainer ignores label smoothing for sigmoid; its CPO sigmoid loss keeps the smoothed
    form, -(1 - eps) log s(beta z) - eps log s(-beta z) of z = chosen score - rejected score. Fed the log-ratios
    as scores it is cDPO."""
    chosen, rejected = t(C, grad=True), t(R, grad=True)
    ours, _, _ = optrush_losses("sigmoid", beta=beta, label_smoothing=label_smoothing, chosen=chosen,
                                rejected=rejected)
    trainer = trainer_with(CPOTrainer, loss_type="sigmoid", beta=beta, label_smoothing=label_smoothing, alpha=0.0)
    theirs, _, _ = trainer.cpo_loss(chosen - t(C0), rejected - t(R0))
    assert_same(ours.mean(), theirs.mean(), [chosen, rejected])


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_equals_trl_cpo_trainer(beta, gamma, label_smoothing):
    chosen, rejected = t(C, grad=True), t(R, grad=True)
    ours, chosen_rewards, rejected_rewards = optrush_losses("simpo", beta=beta, label_smoothing=label_smoothing,
                                                            chosen=chosen, rejected=rejected, gamma=gamma)
    # CPOConfig(loss_type="simpo", cpo_alpha=0.0): get_batch_loss_metrics' loss is cpo_loss(...).mean() on average
    # log-probs (concatenated_forward averages for simpo), plus 0 * NLL
    trainer = trainer_with(CPOTrainer, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                           label_smoothing=label_smoothing, alpha=0.0)
    theirs, theirs_chosen, theirs_rejected = trainer.cpo_loss(chosen / t(NC), rejected / t(NR))
    assert_same(ours.mean(), theirs.mean(), [chosen, rejected])
    torch.testing.assert_close(chosen_rewards, theirs_chosen.detach())
    torch.testing.assert_close(rejected_rewards, theirs_rejected.detach())


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_odds_ratio_term_equals_trl_orpo_trainer(beta):
    """optrush's per-pair ORPO loss is -(chosen average log-prob) - beta log s(log odds ratio); TRL's odds-ratio
    term (get_batch_loss_metrics subtracts its mean from the NLL) must be the second part exactly."""
    chosen, rejected = t(C, grad=True), t(R, grad=True)
    ours, chosen_rewards, rejected_rewards = optrush_losses("orpo", beta=beta, label_smoothing=0.0, chosen=chosen,
                                                            rejected=rejected)
    trainer = trainer_with(ORPOTrainer, beta=beta)
    average_chosen = chosen / t(NC)
    odds_term, theirs_chosen, theirs_rejected, _, _ = trainer.odds_ratio_loss(average_chosen, rejected / t(NR))
    # odds_ratio_loss casts to fp32 (`.float()`), so the comparison is at fp32 precision
    ours_odds = ours + average_chosen
    torch.testing.assert_close(ours_odds.float(), -odds_term, rtol=1e-6, atol=1e-7)
    ours_grads = torch.autograd.grad(ours_odds.sum(), [chosen, rejected], retain_graph=True)  # shares average_chosen
    theirs_grads = torch.autograd.grad(-odds_term.sum(), [chosen, rejected])
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chosen_rewards.float(), theirs_chosen)
    torch.testing.assert_close(rejected_rewards.float(), theirs_rejected)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_log_probs_follow_trl_conventions(average):
    """TRL scores unshifted labels (-100 on prompt and padding) against the logits one position earlier; optrush's
    labels are already shifted. The same sequences give the same summed (DPO) and averaged (IPO, SimPO, ORPO)
    completion log-probs."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64)
    input_ids = torch.randint(0, 11, (3, 7))
    completion = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]]).bool()
    trl_labels = input_ids.masked_fill(~completion, -100)
    shifted = torch.cat([trl_labels[:, 1:], torch.full((3, 1), IGNORE_INDEX)], dim=1)
    theirs = CPOTrainer.get_batch_logps(logits, trl_labels, average_log_prob=average)
    ours = token_logps(logits, shifted).sum(1)
    if average:
        ours = ours / (shifted != IGNORE_INDEX).sum(1)
    torch.testing.assert_close(ours, theirs.float())  # token_logps takes an fp32 log-softmax
    assert not math.isclose(float(theirs[0]), float(theirs[1]))  # distinct sequences, not one repeated value
