"""Each loss against a slow, direct re-computation on tiny hand-built tensors."""
import math
import subprocess
import sys

import pytest
import torch

from raykd.models import Captured, ModelShape, build_masked_lm
from raykd.strategies import STRATEGIES, build_strategy, check_pair, needs_teacher
from raykd.strategies.minilm import MiniLM
from raykd.strategies.scratch import Scratch
from raykd.strategies.tinybert import TinyBERT, uniform_layer_map
from raykd.strategies.vanilla_kd import VanillaKD
from raykd.train import StudentStep, make_optimizer, prepare_batch

torch.manual_seed(0)
B, L = 2, 5
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # second sequence padded


def slow_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def slow_softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_scratch_is_cross_entropy_over_masked_positions():
    logits = torch.randn(3, 7)
    targets = torch.tensor([1, 6, 0])
    loss, _ = Scratch().loss(Captured(masked_logits=logits), None, {"masked_targets": targets})
    slow = sum(-math.log(slow_softmax(logits[i].tolist())[targets[i]]) for i in range(3)) / 3
    assert float(loss) == pytest.approx(slow, rel=1e-5)


@pytest.mark.parametrize("tau,alpha", [(1.0, 0.5), (2.0, 0.7)])
def test_vanilla_kd_sums_kl_over_vocabulary(tau, alpha):
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    targets = torch.tensor([0, 3, 8, 2])
    loss, parts = VanillaKD(temperature=tau, alpha=alpha).loss(Captured(masked_logits=s), Captured(masked_logits=t), {"masked_targets": targets})
    kl = sum(slow_kl(slow_softmax((t[i] / tau).tolist()), slow_softmax((s[i] / tau).tolist())) for i in range(4)) / 4
    ce = sum(-math.log(slow_softmax(s[i].tolist())[targets[i]]) for i in range(4)) / 4
    assert float(parts["kd_loss"]) == pytest.approx(kl, rel=1e-5)
    assert float(loss) == pytest.approx(alpha * tau * tau * kl + (1 - alpha) * ce, rel=1e-5)


def slow_hidden_mse(hs, ht, w, mask):
    total, count = 0.0, 0
    for b in range(hs.shape[0]):
        for i in range(hs.shape[1]):
            if mask[b, i]:
                projected = hs[b, i] @ w.T if w is not None else hs[b, i]
                total += float(((projected - ht[b, i]) ** 2).sum())
                count += ht.shape[-1]
    return total / count


def slow_score_mse(a_s, a_t, mask):
    total, count = 0.0, 0
    for b in range(a_s.shape[0]):
        for h in range(a_s.shape[1]):
            for i in range(L):
                for k in range(L):
                    if mask[b, i] and mask[b, k]:
                        total += float((a_s[b, h, i, k] - a_t[b, h, i, k]) ** 2)
                        count += 1
    return total / count


@pytest.mark.parametrize("d_s,d_t", [(4, 4), (4, 6)])
def test_tinybert_matches_slow_mse_with_projection_and_padding(d_s, d_t):
    heads, layers_s, layers_t = 2, 2, 4
    strategy = TinyBERT(ModelShape(layers_s, d_s, heads, 8), ModelShape(layers_t, d_t, heads, 8))
    assert strategy.layer_map == uniform_layer_map(layers_s, layers_t) == (2, 4)
    assert (strategy.hidden_projection is None) == (d_s == d_t)
    student = Captured(hidden={m: torch.randn(B, L, d_s) for m in range(layers_s + 1)},
                       scores={m: torch.randn(B, heads, L, L) for m in range(1, layers_s + 1)})
    teacher = Captured(hidden={m: torch.randn(B, L, d_t) for m in range(layers_t + 1)},
                       scores={m: torch.randn(B, heads, L, L) for m in range(1, layers_t + 1)})
    # Garbage at padded positions must not matter.
    teacher.scores[4][1, :, :, 3:] = 1e6
    loss, parts = strategy.loss(student, teacher, {"attention_mask": MASK})
    w_e = None if strategy.embedding_projection is None else strategy.embedding_projection.weight.detach()
    w_h = None if strategy.hidden_projection is None else strategy.hidden_projection.weight.detach()
    slow = slow_hidden_mse(student.hidden[0], teacher.hidden[0], w_e, MASK)
    for m, t in ((1, 2), (2, 4)):
        slow += slow_score_mse(student.scores[m], teacher.scores[t], MASK)
        slow += slow_hidden_mse(student.hidden[m], teacher.hidden[t], w_h, MASK)
    assert float(loss) == pytest.approx(slow, rel=1e-5)


def slow_relation_kl(xs, xt, mask, r):
    total, count = 0.0, 0
    for b in range(xs.shape[0]):
        keys = [k for k in range(L) if mask[b, k]]
        for head in range(r):
            def rows(x):
                d_r = x.shape[-1] // r
                part = x[b, :, head * d_r:(head + 1) * d_r]
                return {i: slow_softmax([float(part[i] @ part[k]) / math.sqrt(d_r) for k in keys]) for i in keys}
            rs, rt = rows(xs), rows(xt)
            for i in keys:
                total += slow_kl(rt[i], rs[i])
                count += 1
    return total / count


@pytest.mark.parametrize("d_s,h_s,d_t,h_t,r", [(8, 2, 8, 2, 2), (8, 2, 12, 3, 4)])
def test_minilm_relations_resplit_heads_and_skip_padding(d_s, h_s, d_t, h_t, r):
    strategy = MiniLM(ModelShape(2, d_s, h_s, 8), ModelShape(4, d_t, h_t, 8), teacher_layer=3, relation_heads=r)
    student = Captured(qkv={2: tuple(torch.randn(B, L, d_s) for _ in range(3))})
    teacher = Captured(qkv={3: tuple(torch.randn(B, L, d_t) for _ in range(3))})
    teacher.qkv[3][0][1, 3:] = 1e3  # padded positions
    loss, parts = strategy.loss(student, teacher, {"attention_mask": MASK})
    slow = sum(slow_relation_kl(s, t, MASK, r) for s, t in zip(student.qkv[2], teacher.qkv[3]))
    assert float(loss) == pytest.approx(slow, rel=1e-4)
    assert torch.isfinite(loss)


def _expected_trained(name, student):
    names = {n for n, _ in student.named_parameters()}
    untrained = set()
    if name in ("tinybert", "minilm"):
        untrained |= {n for n in names if n.startswith("cls.predictions.") and "decoder.weight" not in n}
    if name == "minilm":
        top = f"bert.encoder.layer.{student.config.num_hidden_layers - 1}."
        untrained |= {n for n in names if n.startswith(top) and ".attention.self." not in n}
    return names - untrained


@pytest.mark.parametrize("name", STRATEGIES)
def test_one_step_trains_exactly_the_parameters_the_loss_reaches(name):
    s_shape, t_shape, vocab = ModelShape(2, 16, 2, 32), ModelShape(4, 24, 2, 48), 50
    student = build_masked_lm(s_shape, vocab, 8, seed=0, dropout=0.0)
    teacher = build_masked_lm(t_shape, vocab, 8, seed=1, dropout=0.0).eval()
    strategy = build_strategy(name, s_shape, t_shape, {"relation_heads": 4})
    step = StudentStep(student, strategy)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ids = torch.randint(5, vocab, (3, 8))
    labels = torch.full((3, 8), -100)
    labels[:, 2] = ids[:, 2]
    batch = prepare_batch({"input_ids": ids, "attention_mask": torch.ones(3, 8, dtype=torch.long), "labels": labels})
    teacher_out = None
    if strategy.teacher_needs() is not None:
        from raykd.teacher import LocalTeacher
        teacher_out = LocalTeacher(teacher, strategy.teacher_needs()).outputs(ids, batch["attention_mask"], batch["masked_positions"])
    optimizer = make_optimizer(step, lr=1e-2)
    loss, _ = step(batch, teacher_out)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == _expected_trained(name, student)
    if name == "tinybert":
        assert strategy.hidden_projection.weight.grad is not None


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_registered_strategy_describes_itself(name):
    s_shape, t_shape = ModelShape(2, 16, 2, 32), ModelShape(4, 24, 2, 48)
    options = {"relation_heads": 4}
    check_pair(name, s_shape, t_shape, options)
    built = build_strategy(name, s_shape, t_shape, options)
    assert built.name == name
    # The registry's "needs a teacher" is what the built loss asks of the teacher's forward.
    assert needs_teacher(name) == (built.teacher_needs() is not None)
    if needs_teacher(name):
        with pytest.raises(ValueError, match="^teacher: "):
            check_pair(name, s_shape, None, options)
    student_extra, teacher_extra = built.extra_flops(3, 8)
    assert student_extra >= 0 and teacher_extra >= 0


def test_the_registry_names_strategies_without_importing_torch():
    code = ("import sys, raykd.strategies as r, raykd.analysis as a; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(r.STRATEGIES), len(a.STRATEGY_COLOURS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(len(STRATEGIES))] * 2


def slow_cosine_loss(hs, ht, w, mask):
    total, count = 0.0, 0
    for b in range(hs.shape[0]):
        for i in range(hs.shape[1]):
            if mask[b, i]:
                s = (hs[b, i] @ w.T if w is not None else hs[b, i]).tolist()
                t = ht[b, i].tolist()
                dot = sum(x * y for x, y in zip(s, t))
                norm = math.sqrt(sum(x * x for x in s)) * math.sqrt(sum(y * y for y in t))
                total += 1.0 - dot / norm
                count += 1
    return total / count


@pytest.mark.parametrize("d_s,d_t", [(4, 4), (4, 6)])
@pytest.mark.parametrize("tau,alpha_ce,alpha_mlm,alpha_cos", [(2.0, 0.625, 0.25, 0.125), (1.5, 5.0, 2.0, 1.0)])
def test_distilbert_matches_slow_triple_loss_with_projection_and_padding(d_s, d_t, tau, alpha_ce, alpha_mlm, alpha_cos):
    layers_s, layers_t, vocab, masked = 2, 3, 9, 4
    strategy = build_strategy("distilbert", ModelShape(layers_s, d_s, 2, 8), ModelShape(layers_t, d_t, 2, 8),
                              {"temperature": tau, "alpha_ce": alpha_ce, "alpha_mlm": alpha_mlm, "alpha_cos": alpha_cos})
    assert (strategy.projection is None) == (d_s == d_t)
    assert strategy.teacher_needs().hidden_layers == (layers_t,) and strategy.teacher_needs().masked_logits
    student = Captured(hidden={layers_s: torch.randn(B, L, d_s)}, masked_logits=torch.randn(masked, vocab))
    teacher = Captured(hidden={layers_t: torch.randn(B, L, d_t)}, masked_logits=torch.randn(masked, vocab))
    teacher.hidden[layers_t][1, 3:] = 1e6  # garbage at padded positions must not matter
    targets = torch.tensor([0, 3, 8, 2])
    loss, parts = strategy.loss(student, teacher, {"masked_targets": targets, "attention_mask": MASK})
    s, t = student.masked_logits, teacher.masked_logits
    kl = sum(slow_kl(slow_softmax((t[i] / tau).tolist()), slow_softmax((s[i] / tau).tolist())) for i in range(masked)) / masked
    ce = sum(-math.log(slow_softmax(s[i].tolist())[targets[i]]) for i in range(masked)) / masked
    w = None if strategy.projection is None else strategy.projection.weight.detach()
    cos = slow_cosine_loss(student.hidden[layers_s], teacher.hidden[layers_t], w, MASK)
    assert float(parts["kd_loss"]) == pytest.approx(kl, rel=1e-5)
    assert float(parts["cos_loss"]) == pytest.approx(cos, rel=1e-5)
    assert float(loss) == pytest.approx(alpha_ce * tau * tau * kl + alpha_mlm * ce + alpha_cos * cos, rel=1e-5)


def test_distilbert_weight_zero_drops_its_term_and_what_it_needs():
    s_shape, t_shape = ModelShape(2, 16, 2, 32), ModelShape(4, 24, 2, 48)
    no_cos = build_strategy("distilbert", s_shape, t_shape, {"alpha_cos": 0})
    assert no_cos.projection is None and no_cos.extra_flops(3, 8) == (0.0, 0.0)
    assert no_cos.teacher_needs().hidden_layers == () and no_cos.student_needs().hidden_layers == ()
    no_ce = build_strategy("distilbert", s_shape, t_shape, {"alpha_ce": 0})
    assert not no_ce.teacher_needs().masked_logits and no_ce.teacher_needs().upto_layer(4) == 4
    with pytest.raises(ValueError, match="^strategy_options.alpha_mlm: "):
        check_pair("distilbert", s_shape, t_shape, {"alpha_mlm": -1})
    with pytest.raises(ValueError, match="^strategy_options.alpha_ce: "):
        check_pair("distilbert", s_shape, t_shape, {"alpha_ce": 0, "alpha_mlm": 0, "alpha_cos": 0})
