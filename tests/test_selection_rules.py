"""Each selection rule on hand-made tensors, including edge cases."""
import pytest
import torch

from datamatters.errors import UserError
from datamatters.selection import rules as R


def test_n_select_bounds():
    assert R.n_select(320, 0.1) == 32
    assert R.n_select(5, 0.01) == 1  # at least one point
    assert R.n_select(7, 1.0) == 7
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UserError, match="percent_train"):
            R.n_select(10, bad)


def test_reducible_loss_picks_highest_loss_minus_il():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    il = torch.tensor([0.0, 1.9, 0.5, 4.0])
    sel = R.reducible_loss(2, loss=loss, il=il)
    assert sel.idx.tolist() == [2, 0]  # reducible losses 1.0, 0.1, 2.5, 0.0
    assert torch.allclose(sel.scores, loss - il)


def test_reducible_loss_edge_sizes_and_ties():
    loss, il = torch.ones(5), torch.zeros(5)
    assert R.reducible_loss(1, loss=loss, il=il).idx.tolist() == [0]  # ties -> earliest position
    assert sorted(R.reducible_loss(5, loss=loss, il=il).idx.tolist()) == [0, 1, 2, 3, 4]  # n_b = n_B selects all


def test_nan_loss_is_an_error():
    with pytest.raises(UserError, match=r"non-finite loss in the big batch \(1 of 2 values\).*optimizer.lr"):
        R.reducible_loss(1, loss=torch.tensor([1.0, float("nan")]), il=torch.zeros(2))
    with pytest.raises(UserError, match="non-finite irreducible loss"):
        R.reducible_loss(1, loss=torch.tensor([1.0, 2.0]), il=torch.tensor([float("inf"), 0.0]))
    with pytest.raises(UserError, match="non-finite loss"):
        R.ce_loss(1, loss=torch.tensor([float("nan")]))


def test_ce_loss_and_irreducible_loss():
    loss = torch.tensor([0.5, 3.0, 1.0])
    assert R.ce_loss(1, loss=loss).idx.tolist() == [1]
    il = torch.tensor([0.5, 3.0, 0.1])
    assert R.irreducible_loss(2, il=il).idx.tolist() == [2, 0]  # smallest IL first


def test_gradnorm_ub_matches_closed_form():
    logits = torch.tensor([[10.0, 0.0], [0.0, 0.0], [0.0, 10.0]])
    y = torch.tensor([0, 0, 0])
    g = R.grad_norm_bound(logits, y)
    p = torch.softmax(logits, -1)
    expect = torch.sqrt((p[:, 0] - 1) ** 2 + p[:, 1] ** 2)
    assert torch.allclose(g, expect)
    assert R.gradnorm_ub(1, logits=logits, targets=y).idx.tolist() == [2]  # confidently wrong


def test_uniform_is_seeded_and_distinct():
    loss = torch.zeros(10)
    a = R.uniform(4, loss=loss, generator=torch.Generator().manual_seed(0)).idx
    b = R.uniform(4, loss=loss, generator=torch.Generator().manual_seed(0)).idx
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 4


def test_boltzmann_low_temperature_is_greedy_and_schedules():
    loss, il = torch.tensor([0.0, 5.0, 1.0, 2.0]), torch.zeros(4)
    # the reference draws with replacement: at a low temperature every draw is the top point
    sel = R.boltzmann(2, loss=loss, il=il, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    assert sel.idx.tolist() == [1, 1] and sel.stats["unique"] == 1.0
    assert sel.stats["boltzmann_entropy"] == pytest.approx(0.0, abs=1e-6)
    # the earlier variant (a named option) draws distinct points
    sel = R.boltzmann_stepwise(2, loss=loss, il=il, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    assert sorted(sel.idx.tolist()) == [1, 3]
    assert R.temperature_at(0, 11, "linear", 1.0, 0.0) == 1.0
    assert R.temperature_at(10, 11, "linear", 1.0, 0.0) == 0.0
    assert R.temperature_at(5, 11, "geometric", 1.0, 0.01) == pytest.approx(0.1)
    assert R.temperature_at(5, 11, "fixed", 0.3, 0.01) == 0.3
    with pytest.raises(UserError):
        R.temperature_at(0, 1, "cubic")


def test_boltzmann_epoch_temperatures_are_the_reference_formulas():
    assert R.epoch_temperature(7) == 0.25  # default: fixed T = 0.25
    assert [R.epoch_temperature(e, "linear", 0.5, 0.25) for e in range(3)] == [0.5, 0.75, 1.0]
    assert [R.epoch_temperature(e, "geometric", 0.5, factor=2.0) for e in range(3)] == [0.5, 1.0, 2.0]
    with pytest.raises(UserError, match="must stay > 0"):
        R.epoch_temperature(4, "linear", 0.5, -0.25)
    with pytest.raises(UserError, match="unknown temperature schedule 'cubic'"):
        R.epoch_temperature(0, "cubic")


def test_boltzmann_sampling_frequencies_follow_softmax():
    """Many draws in one call (with replacement) have the softmax's frequencies; the entropy logged is softmax's."""
    loss, il = torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3)
    sel = R.boltzmann(6000, loss=loss, il=il, temperature=1.0, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(sel.idx, minlength=3).float()
    p = torch.softmax(loss, 0)
    assert torch.allclose(counts / counts.sum(), p, atol=0.02)
    assert sel.stats["boltzmann_entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    assert sel.stats["unique"] == 3.0


def test_gradnorm_is_diagnostics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    y = torch.zeros(4, dtype=torch.long)
    g = R.grad_norm_bound(logits, y)
    sel = R.gradnorm_is(300, logits=logits, targets=y, generator=torch.Generator().manual_seed(1))
    assert sel.stats["is_max_p"] == pytest.approx(float(g.max() / g.sum()))
    assert sel.stats["unique"] == float(len(set(sel.idx.tolist()))) == 4.0


def _is_estimates(weighted: bool, draws: int = 4000, k: int = 4):
    """Per-draw importance-sampling estimates of the full-batch mean loss and mean gradient (w.r.t. a linear layer's
    weights) for a fixed big batch of 12 points, one seeded draw of ``gradnorm_is`` each."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(12, 3, generator=g), torch.randn(3, 4, generator=g)
    y = torch.randint(0, 4, (12,), generator=g)
    logits = x @ w
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    grads = torch.einsum("nd,nc->ndc", x, torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, 4)).flatten(1)
    f = torch.cat([loss[:, None], grads], 1).double()  # column 0: loss; the rest: the per-example gradient
    est = []
    for seed in range(draws):
        sel = R.gradnorm_is(k, logits=logits, targets=y, generator=torch.Generator().manual_seed(seed))
        wts = sel.weights.double() if weighted else torch.ones(k, dtype=torch.double)
        est.append((wts[:, None] * f[sel.idx]).mean(0))
    est = torch.stack(est)
    return est.mean(0), est.std(0) / draws ** 0.5, f.mean(0)


def test_gradnorm_is_estimates_are_unbiased_by_sampling():
    """E over draws of mean_k(w_i f_i) is the full-batch mean of f (loss and each gradient entry), within 4 standard
    errors; the same draws without the 1/(N p) weights estimate sum_i p_i f_i instead and must fail that bound."""
    mean, se, truth = _is_estimates(weighted=True)
    z = (mean - truth).abs() / se
    assert z.max() < 4.0, z
    assert se.max() < 0.005  # tight: entries are 0.05-1.4, so 4 SE is at most a few % of the typical entry
    mean_u, se_u, _ = _is_estimates(weighted=False)
    z_u = (mean_u - truth).abs() / se_u
    assert z_u.max() > 10.0, z_u  # control: unweighted sampling is biased towards large-gradient points


def test_mc_dropout_family_closed_forms():
    # two MC samples, two points, two classes: point 0 certain and consistent, point 1 confident but disagreeing
    big = 20.0
    mc = torch.tensor([[[big, 0.0], [big, 0.0]], [[big, 0.0], [0.0, big]]])  # (S=2, n=2, C=2)
    ent = R.entropy(1, mc_logits=mc)
    cond = R.conditional_entropy(1, mc_logits=mc)
    bald = R.bald(1, mc_logits=mc)
    ln2 = torch.log(torch.tensor(2.0))
    assert torch.allclose(ent.scores, torch.tensor([0.0, ln2]), atol=1e-6)
    assert torch.allclose(cond.scores, torch.tensor([0.0, 0.0]), atol=1e-6)
    assert torch.allclose(bald.scores, torch.tensor([0.0, ln2]), atol=1e-6)
    assert bald.idx.tolist() == [1] and ent.idx.tolist() == [1]


def test_unknown_rule_is_a_clear_error():
    with pytest.raises(UserError, match="unknown selection method 'foo'"):
        R.get_rule("foo")


def test_svp_scores():
    import numpy as np

    from datamatters.selection.svp import forgetting_score, keep_top, svp_scores

    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]])
    assert np.argmax(svp_scores("entropy", probs=probs)) == 1
    assert np.allclose(svp_scores("least_confidence", probs=probs), [0.0, 0.5, 0.1])
    hist = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1]], bool)  # epochs x points
    assert forgetting_score(hist).tolist() == [1.0, 4.0, 0.0]  # point 1 never learned -> epochs + 1
    assert keep_top(np.array([0.1, 0.9, 0.5, 0.9]), 0.5).tolist() == [1, 3]
