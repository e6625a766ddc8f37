"""The Ray Serve layer: a thin deployment around the engine, its metrics, and the launcher behind `make serve`."""
