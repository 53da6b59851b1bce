"""The real Predictor with faults injected into the real engine, for server tests (COG_PREDICT_TYPE_STUB points here).

FLUX_TEST_FAULT selects the fault (comma-separated):
  oom-once     the transformer raises torch.OutOfMemoryError on its first call (a GPU running out of memory)
  oom-batch    the transformer raises OutOfMemoryError whenever it sees more than one image at once
  slow-steps   every transformer call (one denoising step) first sleeps FLUX_TEST_STEP_SECONDS (default 0.5)
  nsfw-marked  the safety checker (and its second opinion) also flags the second output of a prediction whose
               prompt holds NSFW_MARK
Nothing else differs from predict.py:Predictor.
"""

from __future__ import annotations

import os
import time

import torch

from predict import Predictor

NSFW_MARK = "[rigged: flag the second output]"


class FaultPredictor(Predictor):
    def setup(self) -> None:
        super().setup()
        faults = set(filter(None, os.environ.get("FLUX_TEST_FAULT", "").split(",")))
        step_seconds = float(os.environ.get("FLUX_TEST_STEP_SECONDS", "0.5"))
        state = {"oom_left": 1 if "oom-once" in faults else 0}

        def hook(module, args, kwargs):
            latents = kwargs.get("hidden_states", args[0] if args else None)
            if state["oom_left"]:
                state["oom_left"] -= 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            if "oom-batch" in faults and latents is not None and latents.shape[0] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB (simulated)")
            if "slow-steps" in faults:
                time.sleep(step_seconds)

        transformer = self.engine.pipeline("dev", "txt2img").transformer
        transformer.register_forward_pre_hook(hook, with_kwargs=True)
        if "nsfw-marked" in faults:
            self._rig_safety_checker()

    def _rig_safety_checker(self) -> None:
        engine, marked = self.engine, [False]
        run, flags = engine.run, engine.safety.flags

        def rigged_run(req):
            marked[0] = NSFW_MARK in req.prompt
            return run(req)

        def rigged_flags(imgs):
            got = list(flags(imgs))
            if marked[0] and len(got) > 1:
                got[1] = True
            return got

        engine.run, engine.safety.flags = rigged_run, rigged_flags
        if engine.second_safety is not None:  # and the second opinion agrees on what the first flags
            engine.second_safety.flags = lambda imgs: [marked[0]] * len(imgs)
