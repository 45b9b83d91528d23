"""The module ``dagster dev`` loads: the Dagster definitions of the feature repo that
``$FEATUREPIPE_REPO`` names (else ``./feature_repo``)::

    FEATUREPIPE_REPO=feature_repo dagster dev -h 127.0.0.1 -m featurepipe.orchestration.dagster_defs

Importing it reads the registry; :func:`featurepipe.orchestration.dagster.definitions`
builds the same definitions for a repo given by path, without this module's side effect.
"""

from featurepipe.orchestration.dagster import definitions

defs = definitions()
