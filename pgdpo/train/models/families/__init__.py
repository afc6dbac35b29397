"""The model families, one file each: :mod:`.wan_t2v`, :mod:`.wan_i2v`, :mod:`.unet3d` (each a
:class:`~pgdpo.train.models.spec.ModelSpec`); the list of them is
:data:`pgdpo.train.models.registry.FAMILIES`."""
