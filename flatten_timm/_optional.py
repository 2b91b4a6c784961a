""" Optional dependencies, imported where they are needed, with an error that names the extra to install. """
import importlib


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def import_matplotlib(headless: bool = True):
    """matplotlib.pyplot (on the Agg backend when headless), or an ImportError naming the `viz` extra."""
    try:
        matplotlib = importlib.import_module('matplotlib')
    except ImportError as e:
        raise MissingExtraError("figures need matplotlib, which is not installed: pip install 'flatten-timm[viz]' "
                          "(or pip install matplotlib)") from e
    if headless:
        matplotlib.use('Agg')
    return importlib.import_module('matplotlib.pyplot')
