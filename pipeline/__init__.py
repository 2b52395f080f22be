# The stage config schemas go into Hydra's ConfigStore before anything composes conf/ (pipeline/config).
import pipeline.config  # noqa: F401
