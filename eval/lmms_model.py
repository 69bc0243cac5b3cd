"""The lmms-eval model: a SemHiTok unified LLM answering benchmark questions about one image.

    lmms-eval eval --model semhitok --model_args pretrained=runs/256/mllm/final,max_new_tokens=64 --tasks pope
    (add compile=true on a GPU: CUDA-graph decoding, see mllm/sample.py Decoder)

Each request's first image is tokenized by the model's own visual tokenizer (padded to square, or centre-cropped,
as the model's data.understanding_image says) and placed before the question
(the LLaVA convention the model was trained on); answers are greedy and cut at the task's `until` strings.
loglikelihood scores a continuation after the same chat prompt. One process per model.
"""

from __future__ import annotations

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import load_sampler
from semhitok.tokenizer import encode_images


class SemHiTokLMMS(lmms):
    def __init__(self, pretrained: str, device: str | None = None, max_new_tokens: int = 64, batch_size: int = 1,
                 compile: bool | str = False, **kwargs):
        super().__init__()
        self.decoder, self.visual = load_sampler(pretrained, device, str(compile).lower() in ("1", "true", "yes"))
        self.max_new_tokens = int(max_new_tokens)

    def _image_ids(self, request: Instance) -> torch.Tensor | None:
        """The request's first image -> visual ids [h, w] (None for text-only requests)."""
        _, _, doc_to_visual, doc_id, task, split = request.args[:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        images = [v for v in visuals or [] if hasattr(v, "convert")]
        if not images:
            return None
        return encode_images(self.visual, images[:1], self.decoder.seq_cfg.understanding_image)[0]

    def _turn(self, context: str, ids: torch.Tensor | None) -> list[tuple[str, str]]:
        text = context.replace("<image>", "").strip()
        return [("user", f"<image>\n{text}" if ids is not None else text)]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for request in tqdm(requests, desc="semhitok answering", disable=self.rank != 0):
            context, gen_kwargs = request.args[0], dict(request.args[1] or {})
            ids = self._image_ids(request)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            steps = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            reply = self.decoder.answer(self._turn(context, ids), ids, SamplingConfig(temperature=0.0), steps)
            for stop in until:
                if stop:
                    reply = reply.split(stop)[0]
            out.append(reply)
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        model, builder = self.decoder.model, self.decoder.builder
        for request in tqdm(requests, desc="semhitok scoring", disable=self.rank != 0):
            context, continuation = request.args[0], request.args[1]
            ids = self._image_ids(request)
            prompt = builder.chat_prompt(self._turn(context, ids), None if ids is None else ids.flatten().cpu().numpy())
            target = builder.encode_text(continuation)
            tokens = torch.tensor([prompt + target], device=model.device)
            hidden = model.hidden_states(tokens).last_hidden_state[0, len(prompt) - 1 : -1]  # positions predicting target
            logp = model.logits(hidden).float().log_softmax(-1)
            wanted = torch.tensor(target, device=model.device)
            out.append((float(logp.gather(1, wanted[:, None]).sum()), bool((logp.argmax(-1) == wanted).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("semhitok: multi-round generation is not supported; use single-round tasks")
