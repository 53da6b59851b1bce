"""A predictor that only reports what cog handed it, for the tests that pin coglet's own behaviour
(tests/test_coglet.py): how a file input reaches predict(), where it lies, and what the server does with ids and
webhooks. It loads no model, so its server is ready in a second."""

from __future__ import annotations

import json
import os
import stat
from typing import Optional

from cog import BasePredictor, Input, Path


class EchoPredictor(BasePredictor):
    def setup(self) -> None:
        pass

    def predict(
        self,
        image: Optional[Path] = Input(description="any file input", default=None),
        text: str = Input(description="echoed", default=""),
    ) -> str:
        seen = {"text": text, "type": f"{type(image).__module__}.{type(image).__qualname__}"}
        if image is not None:
            path = os.path.abspath(os.fspath(image))
            seen["value"], seen["path"] = str(image), path
            try:
                info = os.lstat(path)
                seen |= {"regular": stat.S_ISREG(info.st_mode), "mode": oct(stat.S_IMODE(info.st_mode)),
                         "links": info.st_nlink}
            except OSError:
                seen["regular"] = None
        return json.dumps(seen)
