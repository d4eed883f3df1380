"""Logging set-up for the worker processes of a local Ray (kept tiny: every Ray worker imports it)."""
import logging


def quiet_placement_group_cleaner() -> None:
    """Ray Train's PlacementGroupCleaner asks the state API, which needs the dashboard, every few
    seconds and logs a warning each time it is missing; a local Ray runs without the dashboard."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
