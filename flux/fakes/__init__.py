"""Random-weight FLUX models for tests and benchmarks, never served as such: the tiny FLUX (every component at toy
width, built offline in a second, the model a machine without a GPU runs), the full-size FLUX.1-dev architecture
(built on a GPU for the benchmark, or on the meta device for memory planning) and random LoRAs for either (loras.py)."""
