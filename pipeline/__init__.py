"""carseg: find cars in satellite and aerial GeoTIFFs.

One module per stage (sample, tile, rasterize, dataset, train, predict, vectorize, evaluate,
report), shared rooms for settings (config), grids (geo), atomic I/O (io) and the U-Net (model).
"""

__version__ = "0.1.0"
