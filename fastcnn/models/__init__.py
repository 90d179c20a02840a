"""The model zoo, one module per family; each variant registers itself with
:func:`fastcnn.registry.register_model`."""
