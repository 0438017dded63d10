"""`python -m generator new-recipe`: scaffold a recipe and its conformance test (placeholder, see issue 3)."""


def add_new_recipe_args(p):
    pass


def new_recipe(args) -> int:
    raise NotImplementedError("new-recipe is being written")
