"""paperlib: the methods of ClimbQ, LifeQuant, DGMS and CBP, with the data, models, training loop and
run records their companion notebooks use."""

__version__ = "0.1.0"
