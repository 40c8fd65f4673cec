"""fxsparse.recipes: the TOML recipes shipped with fxsparse (load them with fxsparse.load_recipe)."""
from importlib import resources


def available() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))
