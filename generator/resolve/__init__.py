"""Resolution: recipe + config.json -> the architecture spec (spec.py, rope.py), build options (options.py)
checked against the chip profiles (chips.py)."""
