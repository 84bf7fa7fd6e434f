"""One error path (bdiff/errors.py): every bdiff error is a BdiffError, and `command` turns one into a single
`error: ...` line and exit code 2."""
import pytest

from bdiff.config import ConfigError
from bdiff.data import DataError
from bdiff.data.tokenizer import TokenizerError
from bdiff.errors import BdiffError, command
from bdiff.generation.sampling import SamplingError
from bdiff.hub import HubError
from bdiff.training.checkpoint import CheckpointError


@pytest.mark.parametrize("error", [CheckpointError, ConfigError, DataError, HubError, SamplingError, TokenizerError])
def test_every_error_is_a_bdiff_error(error):
    assert issubclass(error, BdiffError) and issubclass(error, ValueError)


def test_command_turns_an_error_into_one_line_and_exit_code_2(capsys):
    @command
    def main(argv=None):
        if argv:
            raise DataError("no shards in 'x' (run `python -m bdiff.data stdlib` first)")
        return 0

    assert main([]) == 0
    assert main(["bad"]) == 2
    assert capsys.readouterr().err == "error: no shards in 'x' (run `python -m bdiff.data stdlib` first)\n"

    @command
    def crashes(argv=None):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # a bug is not bad input: its traceback is shown
        crashes()
