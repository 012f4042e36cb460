"""Settings given as environment variables: VIBEVOICE_POOL_<NAME> for every launch
setting (the container convention). This module reads them as raw text; config.build()
validates them with every other source (default < variable < config file < flag), so
the types, bounds and messages stay the settings model's. It also points out a
VIBEVOICE_POOL_* variable that names no setting.
"""

from __future__ import annotations

import difflib
from typing import Any

from vibevoice_pool.config import ENV_PREFIX, PoolConfig, env_name


def from_environment() -> dict[str, str]:
    """The settings given as environment variables, as raw text for build() to
    validate. pydantic-settings matches the names (the prefix, any case); an empty
    variable counts as unset (compose writes ${UNSET} as empty)."""
    from pydantic import create_model
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Reader(BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore"
        )

    # Every field as plain text: the types, bounds and messages stay PoolConfig's.
    fields: dict[str, Any] = {name: (str | None, None) for name in PoolConfig.model_fields}
    reader = create_model("PoolEnvironment", __base__=Reader, **fields)
    return reader().model_dump(exclude_none=True)


NOT_SETTINGS = ("OWNER_FILE",)  # VIBEVOICE_POOL_OWNER_FILE: the jobs client's, not launch's


def stray_variables(environ: dict[str, str]) -> list[str]:
    """VIBEVOICE_POOL_* variables that name no setting (a typo is otherwise silent)."""
    names = [env_name(n) for n in PoolConfig.model_fields]
    out = []
    for var in sorted(environ):
        upper = var.upper()
        rest = upper.removeprefix(ENV_PREFIX)
        if rest == upper or upper in names or rest in NOT_SETTINGS:
            continue
        near = difflib.get_close_matches(upper, names, n=1)
        out.append(f"${var} is not a setting" + (f"; did you mean ${near[0]}?" if near else ""))
    return out
