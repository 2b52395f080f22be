"""Typed stage configs (issue 13): one config group per stage, named after it, with its schema here.

- `stages.py`: the schema dataclasses (defaults, types, range checks, volatile fields), `SCHEMAS` by group.
- `fields.py`: the field factory (`setting`, `renamed_to`) and the checks.
- `groups.py`: a group's typed values and checks (`group_settings`) and the one cache-key rule (`group_key`).
- `renamed.py`: keys renamed by issue 13, reported with their new name.

Importing this package stores each schema in Hydra's ConfigStore as `<group>/schema`; every conf/<group>
yaml lists it first in its defaults, so composition checks keys and types. `pipeline/__init__.py` imports it,
so any code that uses the pipeline (entry point, tests, notebooks) has the schemas before it composes.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from pipeline.config.groups import group_key, group_settings, group_values, typed_group
from pipeline.config.renamed import check_renamed, renamed_keys_node
from pipeline.config.stages import SCHEMAS

SCHEMA_NAME = "schema"


def store_schemas() -> None:
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=group, name=SCHEMA_NAME, node=schema, provider="pipeline")
    store.store(name="renamed_keys", node=renamed_keys_node(), provider="pipeline")


store_schemas()

__all__ = [
    "SCHEMAS",
    "check_renamed",
    "group_key",
    "group_settings",
    "group_values",
    "store_schemas",
    "typed_group",
]
