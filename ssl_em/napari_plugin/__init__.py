"""napari plugin (npe2): open any volume ssl-em reads, paint a few labels, fine-tune with LoRA, look, correct.

``napari.yaml`` declares a reader (every volume spec ssl-em opens, lazily, OME-Zarr pyramids as multiscale
dask arrays, voxel size as the layer scale), sample data (the phantom) and the fine-tuning widget. The
logic lives in :mod:`ssl_em.napari_plugin.session` (no GUI: tested headless), the widget only wires it to
layers. Needs the optional extra ``ssl-em[napari]``.
"""
