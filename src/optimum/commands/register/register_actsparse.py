"""Registers ``optimum-cli export actsparse`` (optimum discovers this namespace module)."""
from optimum.commands.export.base import ExportCommand

from actsparse.optimum_command import ActSparseExportCommand

REGISTER_COMMANDS = [(ActSparseExportCommand, ExportCommand)]
