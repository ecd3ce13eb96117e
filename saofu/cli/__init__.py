"""The `saofu` command line.

Every command that produces results takes `--json` and then prints exactly one JSON object on
stdout (progress goes to stderr). Bad input is reported as one `error: ...` line, exit code 2; a
mistyped command or option prints click's usage line and the error, exit code 2.

One module per command group; this one only assembles them and holds `main()`. The groups import
torch, Prefect, MLflow and onnxruntime inside their commands, so `saofu --help`, `saofu serve` and
the other commands that do not train never load torch.
"""

from __future__ import annotations

import os
import sys

import typer

# typer >= 0.20 vendors click as typer._click: its exceptions, not the `click` package's, reach us.
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from saofu.cli import bench, data, labeling, labels, release, retrain, search, serve, services, train
from saofu.errors import SaofuError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="saofu: the 福 recogniser's MLOps pipeline.",
)
# Top-level commands, in the order `saofu --help` lists them (a group added without a name lends
# its commands to the root).
for group in (labeling.app, train.app, search.app, release.app, retrain.app, serve.app):
    app.add_typer(group)
app.add_typer(data.app, name="data")
app.add_typer(labels.app, name="labels")
app.add_typer(train.models_app, name="models")
app.add_typer(bench.app, name="bench")
app.add_typer(train.step_app, name="step")
app.add_typer(services.app)  # up, down, status

_CTRL_C = 130  # typer turns a KeyboardInterrupt inside a command into Exit(130)


def main() -> None:
    """Entry point: one clear line for bad input, never a traceback."""
    # No machine here reaches the internet: don't let the ephemeral Prefect server try to.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        # Not standalone: SaofuError and pydantic's ValidationError must reach the handlers below.
        code = app(standalone_mode=False)
    except SaofuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except NoArgsIsHelpError as exc:
        # `saofu` or `saofu data` alone: the help is the answer, not an error. (With rich, typer
        # has already printed it while raising; without, it is the exception's message.)
        if help_text := exc.format_message().strip():
            print(help_text)
        sys.exit(0)
    except ClickException as exc:  # usage errors: "Usage: ...", "Try ... --help", "Error: ..." (exit 2)
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(_CTRL_C)
    except Exception as exc:  # pydantic validation of flow parameters
        import pydantic

        if isinstance(exc, pydantic.ValidationError):
            errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            print(f"error: invalid parameters: {errs}", file=sys.stderr)
            sys.exit(2)
        raise
    # Outside standalone mode typer returns an Exit's code instead of exiting (0 after --help).
    if code == _CTRL_C:
        print("aborted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
