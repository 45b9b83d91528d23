"""Where ``feature_store.yaml`` files applied before featurepipe 0.2 find the batch engine:
it moved to :mod:`featurepipe.feast.materialization_engine` (the Feast adapters sit above the
stages). ``batch_engine: type: featurepipe.online.engine.FeaturepipeMaterializationEngine``
keeps working through this re-export."""

from featurepipe.feast.materialization_engine import (
    FeaturepipeMaterializationEngine,
    FeaturepipeMaterializationEngineConfig,
    collect_results,
    run_options,
)

__all__ = ["FeaturepipeMaterializationEngine", "FeaturepipeMaterializationEngineConfig", "collect_results",
           "run_options"]
