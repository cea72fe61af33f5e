"""A bad or misspelt SHOPREC_* variable: told in one line that names it, not a 50-line traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.settings import SettingsError, get_settings, unknown_variables

SHOPREC = str(Path(sys.executable).parent / "shoprec")


def test_an_invalid_value_names_the_variable_what_it_takes_and_its_default(monkeypatch):
    monkeypatch.setenv("SHOPREC_SERVE_MAX_BATCH_SIZE", "abc")
    monkeypatch.setenv("SHOPREC_TRAIN__EPOCHS", "0")
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as err:
            get_settings()
    finally:
        get_settings.cache_clear()
    lines = str(err.value).splitlines()
    assert "SHOPREC_SERVE_MAX_BATCH_SIZE='abc': input should be a valid integer" in str(err.value)
    assert any(line.startswith("SHOPREC_TRAIN__EPOCHS='0': input should be greater than or equal to 1 (unset, it is "
                               "15)") for line in lines), lines
    assert len(lines) == 2 and "pydantic" not in str(err.value)


def test_a_misspelt_variable_is_named_with_the_setting_it_likely_meant():
    env = {"SHOPREC_EXPLORE_SHAR": "0.5", "SHOPREC_SERVE_MAX_BATCH": "3", "SHOPREC_NO_SUCH_THING": "1",
           "SHOPREC_EXPLORE_SHARE": "0.1", "SHOPREC_TRAIN__EPOCHS": "3", "SHOPREC_CRASH_AT": "x", "HOME": "/root"}
    assert unknown_variables(env) == [
        "SHOPREC_EXPLORE_SHAR is not a shoprec setting, so it changes nothing (did you mean SHOPREC_EXPLORE_SHARE?)",
        "SHOPREC_NO_SUCH_THING is not a shoprec setting, so it changes nothing (README, Configuration, lists them)",
        "SHOPREC_SERVE_MAX_BATCH is not a shoprec setting, so it changes nothing (did you mean "
        "SHOPREC_SERVE_MAX_BATCH_SIZE?)"]


def test_the_command_says_it_in_one_line_and_stack_down_still_works(tmp_path):
    env = {**os.environ, "SHOPREC_SERVE_MAX_BATCH_SIZE": "abc", "SHOPREC_VAR_DIR": str(tmp_path / "var")}
    status = subprocess.run([SHOPREC, "stack", "status"], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 2 and "Traceback" not in status.stderr, status.stderr
    assert status.stderr.splitlines() == [
        "error: invalid settings (fix or unset these variables):",
        "SHOPREC_SERVE_MAX_BATCH_SIZE='abc': input should be a valid integer, unable to parse string as an integer "
        "(unset, it is 64)"]
    # stopping needs only the var dir: a bad value must not keep a running stack up (`make down` reported success)
    down = subprocess.run([SHOPREC, "stack", "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "ignoring invalid settings to stop the stack" in down.stderr, down.stderr
    assert down.stdout.strip() == "stack stopped"
