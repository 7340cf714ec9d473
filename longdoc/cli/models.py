"""``longdoc models``: the default model, known models, cached conversions, and what --model accepts."""

from __future__ import annotations

import sys

from longdoc.cli import options as o
from longdoc.cli.command import takes
from longdoc.cli.interrupts import handled


@takes("json_out")
def models(*, given: o.Given) -> None:
    """The default model, known models, cached conversions, and what --model accepts."""
    from longdoc.render import Reporter, console, plain

    reporter = Reporter(json_mode=given.json_out)
    with handled(reporter):
        from longdoc import models

        rows = models.list_models()
        device = models.resolve_device("auto")
        auto = models.choose_model(device, models.resolve_dtype("auto", device))
        auto_json = {"model": auto.alias, "why": auto.why}
        if given.json_out:
            reporter.json({"models": rows, "auto": auto_json, "cache_dir": str(models.cache_dir())})
            return
        out = console(sys.stdout)
        for row in rows:
            out.print(plain(" · ".join(f"{k}: {v}" for k, v in row.items() if v not in (None, ""))))
        out.print(plain(f"cache: {models.cache_dir()}"))
        out.print(plain(f"--model auto (the default) runs {auto.alias} here: {auto.why}"))
        out.print(
            "--model accepts: auto (the default), an alias above, a local Hugging Face folder (config.json +"
            " *.safetensors; llama, qwen2, mistral), or a .gguf file"
        )
