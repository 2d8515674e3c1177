"""``optimum-cli export actsparse -m MODEL OUTPUT ...``: the same export as ``actsparse export``."""
from __future__ import annotations

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .cli import add_export_arguments, guarded, run_export


class ActSparseExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="actsparse", help="Export to OpenVINO IR with calibrated activation sparsity (SCAP).")

    @staticmethod
    def parse_args(parser):
        add_export_arguments(parser, model_flag=True)

    def run(self):
        code = guarded(run_export, self.args)
        if code:
            sys.exit(code)
