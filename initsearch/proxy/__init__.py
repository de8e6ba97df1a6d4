"""The proxy: stand-in networks, data as tensors on the device, one short training run, population
training, and the scores of a run's curve."""
