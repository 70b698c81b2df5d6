"""The one thread that touches a vLLM engine (cascade/generation/vllm_backend.py): it adds the
requests calls hand it, steps the engine while anything is in flight, and gives each finished
request to the call that owns it. Calls from many threads at once are batched by the engine
together, as one `LLM.generate` over all their prompts would."""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Call:
    """One call in flight: its requests, and a queue of their outputs as they finish (or an
    error)."""

    items: list[tuple[str, Any, Any, Any]]  # (request id, prompt, SamplingParams, LoRARequest)
    # lists of outputs, one per engine step
    finished: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def take(self, timeout: float | None = None) -> list:
        item = self.finished.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item


class EngineThread:
    def __init__(self, engine: Any) -> None:
        self.engine = engine  # vllm's LLMEngine
        # guards _incoming; the engine thread sleeps on it when idle
        self._cv = threading.Condition()
        self._incoming: list[Call] = []
        self._ids = itertools.count()
        threading.Thread(target=self._loop, name="vllm-engine", daemon=True).start()

    def submit(self, prompts: list, params: list, lora: Any = None) -> Call:
        """Requests handed to the engine thread (a LoRARequest, or None, for all of them)."""
        call = Call([(str(next(self._ids)), prompt, p, lora) for prompt, p in zip(prompts, params)])
        if call.items:
            with self._cv:
                self._incoming.append(call)
                self._cv.notify()
        return call

    def _loop(self) -> None:
        engine = self.engine
        owner: dict[str, Call] = {}  # request id -> the call it belongs to, while in the engine
        while True:
            with self._cv:
                while not self._incoming and not owner:
                    self._cv.wait()
                new, self._incoming = self._incoming, []
            for call in new:
                try:
                    for rid, prompt, p, lora in call.items:
                        engine.add_request(rid, prompt, p, lora_request=lora)
                        owner[rid] = call
                except BaseException as e:
                    # e.g. a prompt longer than max_model_len: that call fails alone
                    engine.abort_request([rid for rid, *_ in call.items if owner.pop(rid, None)])
                    call.finished.put(e)
            if not owner:
                continue
            try:
                outs = engine.step()
            except BaseException as e:
                # the engine itself failed: every call in flight fails with it
                for call in set(owner.values()):
                    call.finished.put(e)
                owner.clear()
                continue
            # one hand-off per call and step, not per request: fewer thread wake-ups
            done: dict[Call, list] = {}
            for o in outs:
                if o.finished:
                    done.setdefault(owner.pop(o.request_id), []).append(o)
            for call, finished in done.items():
                call.finished.put(finished)
