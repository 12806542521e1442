"""The CLI side of `spectra.Outputs`: a command's resume journal, and the `wrote` lines once its outputs are in place.

A command that writes files plans them before computing and writes them through one `Outputs`:

    outputs = spectra.Outputs([base, tuned])               # every input the command reads
    with user_errors(outputs), outputs:                    # errors and interrupts: one line, nothing written
        json_out = outputs.file(json_path, "--json")       # refused now if it is an input or shared
        journal = resume_journal(outputs, json_out, resume)
        analysis = spectra.analyze(..., journal=journal)
        spectra.save_analysis(analysis, outputs.stage(json_out))
    wrote_all(outputs)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import spectra
from spectra import OptionsError

from .console import say, wrote

Resume = Annotated[
    bool | None,
    typer.Option(
        "--resume/--no-resume",
        help="a run that was stopped resumes from the journal kept next to its output (the default when the same "
        "command is run again); --resume insists on it, --no-resume starts afresh",
        show_default=False,
    ),
]


def resume_journal(outputs: spectra.Outputs, output: Path | None, resume: bool | None) -> spectra.Journal | None:
    """The journal kept next to `output` (`out.json.journal`) while the run computes, removed once the outputs are
    written; None when the command writes no file (and then --resume is a usage error).

    Raises:
        OptionsError: --resume without an output file; the journal's path is an input.
    """
    if output is None:
        if resume:
            raise OptionsError("--resume needs --json or --html: the journal is kept next to the output")
        return None
    path = outputs.transient(spectra.journal_path(output), "the resume journal")
    return spectra.Journal(path, resume=resume, notify=say)


def wrote_all(outputs: spectra.Outputs) -> None:
    for path in outputs.written:
        wrote(outputs.label(path))
