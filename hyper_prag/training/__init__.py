"""The two trainers: their Lightning modules, data modules and command lines.

    hyper-prag train hypernet fit --config smollm2     (the hypernetwork; hypernet.py, hypernet_data.py)
    hyper-prag train encode --config tiny              (per-document LoRAs; encode.py, = hyper-prag encode)

``--config`` takes a YAML file or a shipped config's name (:func:`hyper_prag.paths.config_file`); every key
of the YAML is also a flag (``--trainer.max_steps 2``). From a checkout, ``python -m train.hypernet fit
--config configs/hypernet/<name>.yaml`` and ``python -m train.encode`` run the same code (``train/`` re-exports
these modules). Nothing below the command line imports this package.
"""
