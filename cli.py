"""What the command-line scripts share and must have before torch is imported (so `--help` answers at once):
the help formatter. Standard library only."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except None and off switches (their help says what happens without them)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)
