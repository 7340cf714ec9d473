"""``longdoc doctor``: what this machine gets, each choice with its reason."""

from __future__ import annotations

import sys

from longdoc.cli import knobs
from longdoc.cli import options as o
from longdoc.cli.command import takes
from longdoc.cli.interrupts import handled
from longdoc.cli.settings import settings


@takes(*o.MODEL_OPTIONS, "json_out", keys=knobs.keys_for("doctor"))
def doctor(*, given: o.Given) -> None:
    """What this machine gets, each choice with its reason.

    The CPU class, and the dtype, packing, quantization and attention kernel that a run picks here, each
    with why (LONGDOC_ISA=avx2|... shows a lesser CPU's; -o pack=... and -o kernel=... what they would change).
    """
    from longdoc.render import Reporter, console, plain

    reporter = Reporter(json_mode=given.json_out)
    with handled(reporter):
        from longdoc.runtime import machine, plan

        cfg = settings(given).cfg
        info = plan.model_info(cfg.model, cfg.device, cfg.dtype, reporter.status, reporter.warn, cfg.quantize)
        report = machine.doctor(
            machine.paths(info.device, info.dtype, info.quantize, cfg.pack, cfg.kernel, info.model_why)
        )
        if given.json_out:
            reporter.json({"model": info.name, **report.to_json()})
            return
        out = console(sys.stdout)
        c = report.cpu
        cap = f" · capped at {c.isa_cap}" if c.isa_cap else ""
        flags = (" ".join(c.flags) or "none of note") if c.flags_known else "unknown (no /proc/cpuinfo or sysctl)"
        out.print(plain(f"cpu: {c.name} · {c.arch} · class {c.klass}{cap} · {c.threads} threads"))
        out.print(plain(f"flags: {flags} · torch kernels: {c.torch_capability}"))
        paths = report.paths
        chosen = {
            "model": info.name,
            "dtype": paths.dtype,
            "packed": paths.packed,
            "quantize": paths.quantize,
            "attention": paths.attention,
        }
        for key, value in chosen.items():
            out.print(plain(f"{key}: {value} ({paths.why[key]})"))
        for name, state in report.kernels.items():
            out.print(plain(f"kernel {name}: {state}"))
        if report.hint:
            out.print(plain(report.hint))
