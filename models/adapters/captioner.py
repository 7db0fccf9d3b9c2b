"""Image captioning VLM as the `Captioner` role (transformers `AutoModelForImageTextToText`, e.g. LLaVA-1.5)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pseudoseg.models.adapters._hf import HFAdapter, autocast
from pseudoseg.models.catalog import DEFAULT_CAPTIONER
from pseudoseg.models.roles import Captioner, Sampling


class HFCaptioner(HFAdapter, Captioner):
    """`AutoProcessor` + `AutoModelForImageTextToText`; the prompt goes through the processor's chat template."""

    def __init__(self, model_id: str = DEFAULT_CAPTIONER, *, device: str = "auto", key: str = "captioner") -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        super().__init__(model_id, device, role="captioner", key=key, hub_id=DEFAULT_CAPTIONER)
        # bf16 weights on CUDA (a 7B VLM in float32 would double memory for no gain in captions), float32 on CPU.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = self.load_model(AutoModelForImageTextToText.from_pretrained, dtype=dtype).to(self.device).eval()
        self.processor = self.load(AutoProcessor.from_pretrained)
        # Decoder-only batching needs left padding so every prompt ends right where generation starts.
        self.processor.tokenizer.padding_side = "left"

    def _prompt_text(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def caption(self, images: Sequence[np.ndarray], prompt: str, sampling: Sampling) -> list[str]:
        """images: uint8 RGB [H, W, 3] each (sizes may differ) → one caption per image, new text only, stripped.

        One conversation per image (the image, then `prompt`), generated as one left-padded batch. Sampling is
        seeded inside a forked RNG (the caller's global torch RNG is untouched); the result depends on the seed
        and on the batch (same images in the same order → same strings). temperature <= 0 → greedy decoding.
        """
        if not images:
            return []
        text = self._prompt_text(prompt)
        inputs = self.processor(
            images=[np.asarray(im) for im in images], text=[text] * len(images), padding=True, return_tensors="pt"
        ).to(self.device)
        sample = sampling.temperature > 0
        gen = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sample)
        if sample:
            gen.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), autocast(self.device):
            torch.manual_seed(sampling.seed)
            out = self.model.generate(**inputs, **gen)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
