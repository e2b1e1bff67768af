"""`python -m mergekit_pcb.evolve evolve|eval ...`: the commands on their own app, usable
before (and besides) their registration in `pcbmerge`."""

import typer

from mergekit_pcb.evolve.cli import register

app = typer.Typer(name="pcbmerge-evolve", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
register(app)

if __name__ == "__main__":
    app()
