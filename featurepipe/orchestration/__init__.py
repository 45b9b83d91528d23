"""Entry points for schedulers: the Dagster definitions of a feature repo, built from its
registry and ``contracts.yaml`` (:mod:`featurepipe.orchestration.dagster`, loaded by
``dagster dev -m featurepipe.orchestration.dagster_defs``). Airflow users call the same
library functions from a DAG of their own (``docs/orchestration.md``).

Nothing else in featurepipe imports this package: ``dagster`` is an extra
(``pip install 'featurepipe[dagster]'``) and is imported here only.
"""
