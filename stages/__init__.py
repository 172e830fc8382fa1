"""Thin Typer wrappers, one per DVC stage; ``stages.cli`` mounts them as ``wsss <stage>``."""
