"""What `make` sets up besides the packages (Makefile)."""
import pathlib
import sys

from jupyterlab_server.settings_utils import get_settings


def test_jupyterlab_asks_nothing_about_news(tmp_path):
    """`make` writes JupyterLab's settings overrides into .venv, not the user's home: `make lab`
    never asks whether to fetch Jupyter news, and never checks for updates (no internet here)."""
    lab = pathlib.Path(sys.prefix) / "share" / "jupyter" / "lab"
    settings, _ = get_settings(str(lab / "settings"), str(lab / "schemas"), str(tmp_path),
                               schema_name="@jupyterlab/apputils-extension:notification")
    defaults = {name: field["default"] for name, field in settings["schema"]["properties"].items()}
    assert defaults["fetchNews"] == "false"  # "none", the default, is what makes it ask
    assert defaults["checkForUpdates"] is False
