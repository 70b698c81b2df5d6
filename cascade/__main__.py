"""Entry point: compose the Hydra config, turn it into typed dataclasses, hand it to the driver.

    python -m cascade +stage=4b models=tiny
    python -m cascade +stage=27b run_dir=s3://bucket/cascade cluster=multinode  # or a shared path
    python -m cascade --help | --cfg job
    python -m cascade serve +stage=4b release.enabled=true    # sub-commands come first
    python -m cascade harness +stage=4b release.enabled=true  # (cascade/serve.py, harness.py)
    python -m cascade status +stage=4b [--json]               # the run's state (cascade/status.py)
    python -m cascade report +stage=4b          # <run_dir>/report/index.html (cascade/report.py)
    python -m cascade +stage=27b plan=true [--json]   # what it needs and takes (cascade/plan.py)
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cascade.config import Config, ConfigError, register

register()
log = logging.getLogger("cascade")


@hydra.main(version_base="1.3", config_path="pkg://cascade.conf", config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    if OmegaConf.is_missing(dcfg, "target"):
        log.error("no stage given: add +stage=<name>; valid stages: %s", ", ".join(dcfg.stages))
        sys.exit(2)
    try:
        cfg: Config = OmegaConf.to_object(dcfg)  # runs Config.__post_init__ checks
    except ConfigError as e:
        log.error("config error: %s", e)
        sys.exit(2)
    from cascade.driver import run  # heavy imports only after the config is known to be valid
    from cascade.lease import LeaseLost
    from cascade.gguf import ReleaseError
    from cascade.modeling import FusionError
    from cascade.preemption import EXIT_CODE, Preempted
    from stages.gate import NotPromoted

    try:
        run(cfg)
    except ConfigError as e:
        log.error("input error: %s", e)
        sys.exit(2)
    except NotPromoted as e:
        log.error("%s", e)
        sys.exit(2)
    except FusionError as e:
        log.error("fusion check failed, nothing committed for the phase (not retried: it is "
                  "deterministic): %s", e)
        sys.exit(1)
    except ReleaseError as e:
        log.error("release refused, nothing committed for it: %s", e)
        sys.exit(1)
    except LeaseLost as e:
        log.error("lease lost: %s", e)
        sys.exit(3)
    except Preempted:
        log.error("pre-empted (SIGTERM): what the run had is saved; run the same command to resume")
        sys.exit(EXIT_CODE)


# sub-commands, read before Hydra's overrides: name -> (module, flags it takes)
SUBCOMMANDS = {"serve": ("serve", ()), "harness": ("harness", ()),
               "status": ("status", ("--json",)),
               "report": ("report", ()), "plan": ("plan", ("--json",))}


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:]
    if "plan=true" in args:
        # `+stage=27b plan=true`: the planner (cascade/plan.py), like `plan +stage=27b`
        args = ["plan"] + [a for a in args if a != "plan=true"]
    if args and args[0] in SUBCOMMANDS:
        import importlib

        from omegaconf.errors import MissingMandatoryValue

        from cascade.config import compose

        name, (module, known) = args[0], SUBCOMMANDS[args[0]]
        flags = [a for a in args[1:] if a.startswith("--")]
        if {"--help", "-h"} & set(args[1:]):  # the sub-command's own page: its module's docstring
            doc = importlib.import_module(f"cascade.{module}").__doc__ or ""
            print(f"python -m cascade {name} +stage=<stage> [overrides] "
                  f"{' '.join(f'[{k}]' for k in known)}\n")
            print(doc.strip())
            return
        if set(flags) - set(known):
            log.error("%s: unknown option %s (known: %s)", name,
                      " ".join(sorted(set(flags) - set(known))), " ".join(known) or "none")
            sys.exit(2)
        try:
            importlib.import_module(f"cascade.{module}").main(
                compose([a for a in args[1:] if a not in flags]), *flags
            )
        except MissingMandatoryValue:
            log.error("%s: no stage given: add +stage=<name>", name)
            sys.exit(2)
        except ConfigError as e:
            log.error("%s: %s", name, e)
            sys.exit(2)
        return
    _hydra_main()


if __name__ == "__main__":
    main()
