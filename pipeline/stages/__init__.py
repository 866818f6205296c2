"""The stages: each turns the files of the one before into its own (sample and base write
scenes; tile, rasterize, train, predict, vectorize, batch, suggest, evaluate, report).

A stage is run only through :mod:`pipeline.runner` (guard, lock, freshness, stamp). Stages stand
on the shared rooms of :mod:`pipeline` (errors, files, scenes, io, layout, config, geo, model,
bundle, engines, ...); no shared room imports a stage.
"""
