"""The offline API: `LLM(model=DIR, adapters={...}).generate(prompts, adapters=[...])`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lorafleet.engine.build import build_engine
from lorafleet.engine.config import EngineConfig
from lorafleet.engine.request import ParamError, SamplingParams
from lorafleet.engine.sampling import TokenLogprobs

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass
class GenerationResult:
    """One prompt's generation: all generated token ids (incl. a final EOS) and their text."""

    prompt: str | list[int]
    adapter: str | None
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None  # one per generated token, with `logprobs=N`
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # per prompt token ([0] None), `prompt_logprobs=N`


class LLM:
    """Runs the engine synchronously in this process. Engine options are EngineConfig fields."""

    def __init__(self, model: str, adapters: dict[str, str] | None = None, device: str = "cpu", tp: int = 1,
                 **engine_options) -> None:
        config = EngineConfig(device=device, tensor_parallel_size=tp, **engine_options)
        self.engine, self.tokenizer = build_engine(str(model), config, adapters)

    def close(self) -> None:
        """Stop executor processes (tensor parallelism); the in-process executor needs nothing."""
        close = getattr(self.engine.executor, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_adapter(self, name: str, path: str) -> None:
        self.engine.add_adapter(name, str(path))

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ParamError("prompt", "this model has no tokenizer: pass token ids")
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def generate(self, prompts: list[str | list[int]], adapters: list[str | None] | None = None,
                 **sampling) -> list[GenerationResult]:
        """Generate for every prompt in one continuous batch; sampling options as SamplingParams
        (defaults: greedy, max_tokens 16). Results come back in prompt order."""
        unknown = set(sampling) - _SAMPLING_FIELDS
        if unknown:
            raise ParamError(sorted(unknown)[0], "unknown sampling option")
        sampling.setdefault("temperature", 0.0)
        if "stop" in sampling and isinstance(sampling["stop"], str):
            sampling["stop"] = (sampling["stop"],)
        if isinstance(sampling.get("logit_bias"), dict):
            sampling["logit_bias"] = tuple(sorted(sampling["logit_bias"].items()))
        params = SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in sampling.items()})
        adapters = adapters or [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise ParamError("adapters", "needs one entry (name or None) per prompt")
        ids = [f"offline-{i}" for i in range(len(prompts))]
        try:
            for rid, prompt, adapter in zip(ids, prompts, adapters):
                self.engine.add_request(rid, self.encode(prompt), params, adapter)
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        results = {rid: GenerationResult(p, a, [], "", "", [] if params.logprobs is not None else None)
                   for rid, p, a in zip(ids, prompts, adapters)}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                result = results[out.request_id]
                result.token_ids += out.new_token_ids
                result.text += out.new_text
                if result.logprobs is not None:
                    result.logprobs += out.logprobs
                if out.prompt_logprobs is not None:
                    result.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    result.finish_reason = out.finish_reason
        return [results[rid] for rid in ids]
