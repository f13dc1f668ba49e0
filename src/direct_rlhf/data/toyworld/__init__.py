"""The toy world: a small, fully generated world in which a tiny base model can know things and
can be rude, so that the whole method (and its three axes) runs offline on a CPU.

See docs/toyworld.md. `generate.write_world` is the entry point.
"""
