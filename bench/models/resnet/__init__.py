"""A ResNet-18-sized network with random, seeded weights (``build.py``)."""
