"""Losses against direct loop re-implementations of the papers' formulas (fmbseg Eq. 1–4, use Eq. 1)."""

from __future__ import annotations

import math

import pytest
import torch

from pseudoseg.models.training.losses import segment_text_loss, segment_text_loss_dedup, tsupcon_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit_rows(x: torch.Tensor) -> list[list[float]]:
    rows = []
    for r in x.double().tolist():
        n = math.sqrt(sum(v * v for v in r))
        rows.append([v / n for v in r])
    return rows


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def ref_tsupcon(z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float = 1.0,
                anchor_positive: bool = True) -> float:
    """fmbseg-paper Eq. 1–4 written out with plain-Python float64 loops over i, j, k, l (no tensor code).

    Eq. 4 as printed sums over l with y_l = y_i (the anchor l = i included) and divides by N_{y_i}, the number of
    patches of that label (i included); anchor_positive=False is SupCon's P(i) = {l ≠ i} instead (0 if empty).
    temperature divides every dot product (the equations have none: 1). Ignored patches (label < 0) are not in
    the batch; M = 1 has no pair (Σ_{j≠i} empty): ℓ_im is taken as 0 there, as the loss documents."""
    idx = [i for i, y in enumerate(labels.tolist()) if y >= 0]
    zs = _unit_rows(z)
    zs = [zs[i] for i in idx]
    ys = [int(labels[i]) for i in idx]
    ts = _unit_rows(text)
    m, k = len(zs), len(ts)  # M = B*N patches of the batch, K text features
    if m == 0:
        return 0.0

    def sim(a, b):
        return _dot(a, b) / temperature

    def l_t_pair(i, c):  # Eq. 3: ℓ_t(z_i, t_c) with c = y_i
        denom = sum(math.exp(sim(zs[i], ts[q])) for q in range(k))
        denom += sum(math.exp(sim(zs[i], zs[j])) for j in range(m) if j != i)
        return -sim(zs[i], ts[c]) + math.log(denom)

    def l_t(c):  # Eq. 2
        members = [i for i in range(m) if ys[i] == c]
        return sum(l_t_pair(i, c) for i in members) / len(members) if members else 0.0

    def l_im(i):  # Eq. 4
        if m == 1:
            return 0.0
        log_denom = math.log(sum(math.exp(sim(zs[i], zs[j])) for j in range(m) if j != i))
        same = [q for q in range(m) if ys[q] == ys[i] and (anchor_positive or q != i)]
        if not same:
            return 0.0
        return sum(-sim(zs[i], zs[q]) + log_denom for q in same) / len(same)  # q = the paper's l

    return (sum(l_t(c) for c in range(k)) + sum(l_im(i) for i in range(m))) / (m + k)  # Eq. 1


def ref_segment_text(seg: torch.Tensor, txt: torch.Tensor, scale: float, ids: list[int] | None = None) -> float:
    """Eq. 1 with loops; with ids, pairs (i, j≠i) of equal ids are left out of both denominators."""
    s, t = _unit_rows(seg), _unit_rows(txt)
    k = len(s)
    if k == 0:
        return 0.0
    ids = list(range(k)) if ids is None else ids
    total = 0.0
    for i in range(k):
        pos = scale * _dot(s[i], t[i])
        row = [scale * _dot(s[i], t[j]) for j in range(k) if j == i or ids[j] != ids[i]]
        col = [scale * _dot(s[j], t[i]) for j in range(k) if j == i or ids[j] != ids[i]]
        mr, mc = max(row), max(col)
        total += -(pos - mr - math.log(sum(math.exp(v - mr) for v in row)))
        total += -(pos - mc - math.log(sum(math.exp(v - mc) for v in col)))
    return total / (2 * k)


def _case(seed: int, m: int = 13, k: int = 5, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=g) * 2
    text = torch.randn(k, d, generator=g)
    # class 0: several patches; class 1: a singleton; class 2: absent; class 3: two; class 4: rest; some ignored
    labels = torch.tensor([0, 0, 0, 1, -1, 3, 3, -1, 4, 4, 4, 0, -5][:m])
    return z, labels, text


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
@pytest.mark.parametrize("anchor_positive", [True, False])
def test_tsupcon_matches_equations_1_to_4(seed: int, temperature: float, anchor_positive: bool) -> None:
    """The loss against the loop reference of Eq. 1–4 on random inputs (singleton, absent and ignored classes)."""
    z, labels, text = _case(seed)
    got = tsupcon_loss(z, labels, text, temperature=temperature, anchor_positive=anchor_positive)
    assert got.dtype == torch.float32 and got.ndim == 0
    want = ref_tsupcon(z, labels, text, temperature, anchor_positive)
    assert abs(float(got) - want) < 1e-5 * max(1.0, abs(want))


@pytest.mark.parametrize("seed", range(4))
def test_tsupcon_matches_equations_on_random_batches(seed: int) -> None:
    """Random sizes, label sets and dimensions; the defaults are the paper's: τ = 1, Eq. 4 as printed."""
    g = torch.Generator().manual_seed(100 + seed)
    m, k, d = (int(v) for v in torch.randint(2, 24, (3,), generator=g))
    z, text = torch.randn(m, d, generator=g) * 3, torch.randn(k, d, generator=g)
    labels = torch.randint(-1, k, (m,), generator=g)
    want = ref_tsupcon(z, labels, text)
    assert abs(float(tsupcon_loss(z, labels, text)) - want) < 1e-5 * max(1.0, abs(want))


def test_tsupcon_training_defaults_are_the_papers_equations() -> None:
    """TrainAlignment's loss step with the default settings ([train_alignment] temperature, anchor_positive) is
    Eq. 1–4 as printed: plain dot products of unit vectors (τ = 1), the anchor among its own positives."""
    from pseudoseg.models.training.params import TrainAlignmentParams
    from pseudoseg.models.training.trainer import alignment_step

    for seed in range(3):
        z, labels, text = _case(seed)
        step = alignment_step(text, TrainAlignmentParams())
        got = step(lambda tokens, mask: tokens, {"tokens": z[None], "labels": labels[None]})
        want = ref_tsupcon(z, labels, text, temperature=1.0, anchor_positive=True)
        assert abs(float(got) - want) < 1e-5 * max(1.0, abs(want))


def test_tsupcon_anchor_term_is_eq4_as_printed() -> None:
    """With the anchor among its positives, a class-k patch's ℓ_im is the SupCon one reweighted by (N−1)/N plus the
    constant −1/(N·τ); a patch alone in its class gets −1/τ + log Σ_{j≠i} instead of 0."""
    z, labels, text = _case(7)
    a = float(tsupcon_loss(z, labels, text, anchor_positive=True))
    b = float(tsupcon_loss(z, labels, text, anchor_positive=False))
    assert a != pytest.approx(b)
    single = torch.tensor([0, 1])  # two singleton classes: SupCon's ℓ_im is 0, Eq. 4's is −1 + log exp(z_0·z_1)
    zn = torch.nn.functional.normalize(z[:2], dim=-1)
    gap = 2 * (-1.0 + float(zn[0] @ zn[1])) / (2 + text.shape[0])
    got = float(tsupcon_loss(z[:2], single, text)) - float(tsupcon_loss(z[:2], single, text, anchor_positive=False))
    assert got == pytest.approx(gap, abs=1e-6)


def test_tsupcon_ignored_patches_take_no_part() -> None:
    z, labels, text = _case(3)
    keep = labels >= 0
    a = tsupcon_loss(z, labels, text)
    b = tsupcon_loss(z[keep], labels[keep], text)
    assert torch.equal(a, b)
    z2 = z.clone()
    z2[~keep] = torch.randn(int((~keep).sum()), z.shape[1]) * 100  # whatever an ignored patch holds
    assert torch.equal(tsupcon_loss(z2, labels, text), a)


def test_tsupcon_temperature_scales_similarities() -> None:
    z, labels, text = _case(4)
    # inputs are normalised inside: their scale changes nothing; τ divides every similarity (reference does too)
    assert abs(float(tsupcon_loss(z * 7, labels, text * 0.3)) - float(tsupcon_loss(z, labels, text))) < 1e-5
    for tau in (0.05, 0.5, 2.0):
        assert abs(float(tsupcon_loss(z, labels, text, tau)) - ref_tsupcon(z, labels, text, tau)) < 1e-4 * max(
            1.0, ref_tsupcon(z, labels, text, tau))
    assert float(tsupcon_loss(z, labels, text, 0.5)) != pytest.approx(float(tsupcon_loss(z, labels, text, 1.0)))
    with pytest.raises(ValueError):
        tsupcon_loss(z, labels, text, 0.0)


def test_tsupcon_edge_cases_and_gradients() -> None:
    z, labels, text = _case(5)
    # all ignored: defined as 0, still differentiable with finite (zero) gradients
    zz, tt = z.clone().requires_grad_(True), text.clone().requires_grad_(True)
    loss = tsupcon_loss(zz, torch.full_like(labels, -1), tt)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(zz.grad).all() and torch.isfinite(tt.grad).all()
    # a single patch: only the prototype term
    one = tsupcon_loss(z[:1], labels[:1], text)
    assert abs(float(one) - ref_tsupcon(z[:1], labels[:1], text)) < 1e-6
    # every patch a singleton class: no patch–patch positives at all
    lab = torch.tensor([0, 1, 2, 3, 4])
    assert abs(float(tsupcon_loss(z[:5], lab, text)) - ref_tsupcon(z[:5], lab, text)) < 1e-5
    # gradients finite, also for extreme temperatures and a zero vector among the patches
    z3 = z.clone()
    z3[2] = 0.0
    for tau in (1.0, 1e-3):
        zz = z3.clone().requires_grad_(True)
        tt = text.clone().requires_grad_(True)
        loss = tsupcon_loss(zz, labels, tt, tau)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zz.grad).all() and torch.isfinite(tt.grad).all()
    with pytest.raises(ValueError):
        tsupcon_loss(z, torch.full_like(labels, 9), text)


def test_tsupcon_gradcheck_double() -> None:
    z, labels, text = _case(6, m=7, k=3, d=4)
    labels = torch.tensor([0, 0, 1, -1, 2, 2, 0])
    zz = z.double().requires_grad_(True)
    tt = text.double().requires_grad_(True)

    def f(a, b):
        # the loss runs in float32; gradcheck needs float64, so compare analytic vs numeric at a loose tolerance
        return tsupcon_loss(a, labels, b, 0.5).double()

    assert torch.autograd.gradcheck(f, (zz, tt), eps=1e-3, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_segment_text_loss_matches_loops(seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    seg, txt = torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g)
    got = segment_text_loss(seg, txt, scale)
    assert abs(float(got) - ref_segment_text(seg, txt, scale)) < 1e-5 * max(1.0, float(got))
    # symmetric in the two directions
    assert abs(float(segment_text_loss(txt, seg, scale)) - float(got)) < 1e-5
    # unique ids: the dedup variant is the same loss
    dd = segment_text_loss_dedup(seg, txt, torch.arange(9), scale)
    assert abs(float(dd) - float(got)) < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_text_loss_dedup_matches_loops(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = [3, 1, 3, 7, 1, 3, 0, 5]
    vocab = torch.randn(8, 6, generator=g)
    txt = vocab[ids]  # identical texts → identical embeddings
    seg = torch.randn(8, 6, generator=g)
    got = segment_text_loss_dedup(seg, txt, torch.tensor(ids), 30.0)
    assert abs(float(got) - ref_segment_text(seg, txt, 30.0, ids)) < 1e-5 * max(1.0, float(got))
    # differs from the plain loss, which treats a duplicate text as a negative
    assert float(segment_text_loss(seg, txt, 30.0)) > float(got)


def test_segment_text_losses_edge_cases_and_gradients() -> None:
    for fn in (lambda s, t: segment_text_loss(s, t), lambda s, t: segment_text_loss_dedup(s, t, torch.zeros(
            s.shape[0], dtype=torch.long))):
        s = torch.zeros(0, 4, requires_grad=True)
        t = torch.zeros(0, 4, requires_grad=True)
        loss = fn(s, t)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.isfinite(s.grad).all()
    # one segment: a single pair is its own softmax → loss 0
    assert float(segment_text_loss(torch.randn(1, 4), torch.randn(1, 4))) == pytest.approx(0.0, abs=1e-6)
    # all texts identical: every row/column has only its positive left → 0, finite gradients
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(1, 4).repeat(5, 1).requires_grad_(True)
    loss = segment_text_loss_dedup(s, t, torch.zeros(5, dtype=torch.long), 30.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 4, requires_grad=True)
    segment_text_loss_dedup(s, t, torch.tensor([0, 0, 1, 2, 2, 2]), 100.0).backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        segment_text_loss(torch.randn(3, 4), torch.randn(2, 4))
