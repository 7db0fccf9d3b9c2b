"""Training losses of the two trainable heads.

- `tsupcon_loss`: FMbSeg's TSupCon (fmbseg-paper §3.3, Eq. 1–4) for the alignment block — text features act as
  class prototypes (a smooth max of SupCon and cross-entropy on patch–text pairs) plus SupCon on patch–patch pairs.
- `segment_text_loss`: USE's symmetric segment–text contrastive loss (use-paper §3.2, Eq. 1) for unique texts;
  `segment_text_loss_dedup` for batches where several segments share one text.

All inputs are L2-normalised here, and the maths runs in float32 with autocast disabled, so a bf16 forward under
`models.adapters._hf.autocast` still gets exact, stable losses (logsumexp everywhere, never exp of raw logits).
Empty inputs (no segments, or every patch ignored) give a loss of exactly 0 that is still connected to the inputs,
so `loss.backward()` works and leaves finite (zero) gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["tsupcon_loss", "segment_text_loss", "segment_text_loss_dedup"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that depends on `tensors` (finite zero gradient for each)."""
    return sum((t.float().sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))


def tsupcon_loss(z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float = 1.0, *,
                 anchor_positive: bool = True) -> torch.Tensor:
    """TSupCon (fmbseg-paper Eq. 1–4) over the non-ignored patches of a batch.

    z: float [M0, D] patch embeddings (all images of the batch, flattened); labels: int [M0], class index into
    `text`, negative = ignore (an ignored patch is neither anchor, positive nor negative); text: float [K, D], one
    prototype per class (all K classes count in the denominator, also those absent from the batch).
    Both z and text are L2-normalised here (the paper: "all the feature vectors ... have unit norm, and the
    similarities are expressed as a dot product"). With M non-ignored patches z_i of class y_i and s(a, b) = a·b/τ:

      Eq. 3  ℓ_t(z_i, t_{y_i}) = −s(z_i, t_{y_i}) + log(Σ_k exp s(z_i, t_k) + Σ_{j≠i} exp s(z_i, z_j))
      Eq. 2  ℓ_t(t_k)  = (1/N_k) Σ_{i: y_i=k} ℓ_t(z_i, t_k)       (0 when class k has no patch)
      Eq. 4  ℓ_im(z_i) = (1/N_{y_i}) Σ_{l: y_l=y_i} (−s(z_i, z_l) + log Σ_{j≠i} exp s(z_i, z_j))
      Eq. 1  loss      = (Σ_k ℓ_t(t_k) + Σ_i ℓ_im(z_i)) / (M + K)

    temperature τ: the equations have none, i.e. τ = 1 (the default); other values divide every similarity.
    anchor_positive=True is Eq. 4 as written: l runs over every patch with y_l = y_i, the anchor l = i included,
    and N_{y_i} counts it (its term −s(z_i, z_i) = −1/τ is a constant: it changes the value and the weight
    (N−1)/N of the attraction, and a patch alone in its class still gets the repulsion log Σ_{j≠i}).
    anchor_positive=False is SupCon's convention (Khosla et al., P(i) excludes i): the mean over l ≠ i, and 0 for
    a patch with no other patch of its class. M = 0 gives 0 and M = 1 gives only the ℓ_t term (Σ_{j≠i} is empty,
    ℓ_im is taken as 0), both connected to z and text. Memory is O(M²): 5 images × 1,600 patches → 8,000² floats.
    Returns a float32 scalar.
    """
    if z.ndim != 2 or text.ndim != 2 or z.shape[1] != text.shape[1] or labels.shape != z.shape[:1]:
        raise ValueError(f"tsupcon_loss: z [M, D], labels [M], text [K, D] expected, got {tuple(z.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(text.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(z.device.type, enabled=False):
        keep = labels >= 0
        k = text.shape[0]
        y = labels[keep].long()
        m = int(y.numel())
        if m == 0:
            return _zero_like_graph(z, text)
        if int(y.max()) >= k:
            raise ValueError(f"tsupcon_loss: label {int(y.max())} but only {k} text prototypes")
        zn = _unit(z[keep])
        tn = _unit(text)
        s_zt = zn @ tn.T / temperature  # [M, K]
        s_zz = zn @ zn.T / temperature  # [M, M]
        eye = torch.eye(m, dtype=torch.bool, device=z.device)
        s_zz_off = s_zz.masked_fill(eye, float("-inf"))  # j ≠ i

        # ℓ_t: patch vs its prototype, against all prototypes and all other patches; K ≥ 1 keeps it finite.
        lse_t = torch.logsumexp(torch.cat([s_zt, s_zz_off], dim=1), dim=1)  # [M]
        l_t = lse_t - s_zt.gather(1, y[:, None]).squeeze(1)
        n_k = torch.bincount(y, minlength=k).to(s_zt.dtype)  # patches per class
        sum_t = (l_t / n_k[y]).sum()  # = Σ_k mean_{i: y_i=k} ℓ_t(z_i); absent classes add 0

        # ℓ_im: SupCon over patch pairs. With m == 1 there is no pair at all (and the j ≠ i logsumexp is empty).
        if m > 1:
            pos = y[:, None] == y[None, :]
            if not anchor_positive:
                pos = pos & ~eye
            n_pos = pos.sum(1)
            lse_im = torch.logsumexp(s_zz_off, dim=1)  # finite: every row has m − 1 ≥ 1 entries
            mean_pos = (s_zz * pos).sum(1) / n_pos.clamp_min(1)
            l_im = torch.where(n_pos > 0, lse_im - mean_pos, torch.zeros_like(lse_im))
            sum_im = l_im.sum()
        else:
            sum_im = s_zz.sum() * 0.0
        return (sum_t + sum_im) / (m + k)


def segment_text_loss(seg_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float = 30.0) -> torch.Tensor:
    """USE's symmetric segment–text contrastive loss (use-paper Eq. 1) for k unique texts.

    seg_emb: float [k, D]; text_emb: float [k, D], row i is the text of segment i and no two rows are the same
    text (use `segment_text_loss_dedup` otherwise). Both are L2-normalised here; logits = cos × logit_scale (the
    paper's "temperature τ = 30" multiplies). Loss = ½ (CE over texts per segment + CE over segments per text),
    each averaged over the k pairs. k = 0 gives 0. Returns a float32 scalar.
    """
    if seg_emb.shape != text_emb.shape or seg_emb.ndim != 2:
        raise ValueError(f"segment_text_loss: seg_emb and text_emb [k, D] expected, got {tuple(seg_emb.shape)}, "
                         f"{tuple(text_emb.shape)}")
    with torch.autocast(seg_emb.device.type, enabled=False):
        if seg_emb.shape[0] == 0:
            return _zero_like_graph(seg_emb, text_emb)
        logits = _unit(seg_emb) @ _unit(text_emb).T * logit_scale
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def segment_text_loss_dedup(
    seg_emb: torch.Tensor, text_emb: torch.Tensor, text_ids: torch.Tensor, logit_scale: float = 30.0
) -> torch.Tensor:
    """`segment_text_loss` for batches where several segments carry the same text.

    text_ids: int [k]; equal ids mean identical texts (e.g. the index of the expression in the vocabulary).
    Strategy: **masking**. Pair (i, i) stays the one positive of row i and of column i; every other pair (i, j)
    with text_ids[i] == text_ids[j] is removed from both softmaxes (logit −inf), so a duplicate text is never a
    negative of a segment it also describes, and no pair is counted as a positive twice. With all ids distinct this
    is exactly `segment_text_loss`. Returns a float32 scalar; k = 0 gives 0.
    """
    if seg_emb.shape != text_emb.shape or seg_emb.ndim != 2 or text_ids.shape != seg_emb.shape[:1]:
        raise ValueError(f"segment_text_loss_dedup: seg_emb, text_emb [k, D] and text_ids [k] expected, got "
                         f"{tuple(seg_emb.shape)}, {tuple(text_emb.shape)}, {tuple(text_ids.shape)}")
    with torch.autocast(seg_emb.device.type, enabled=False):
        k = seg_emb.shape[0]
        if k == 0:
            return _zero_like_graph(seg_emb, text_emb)
        logits = _unit(seg_emb) @ _unit(text_emb).T * logit_scale
        same = text_ids[:, None] == text_ids[None, :]
        eye = torch.eye(k, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        target = torch.arange(k, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
